"""The optimizer: offload.AdamW (torch.optim.AdamW's arguments and defaults) and the runner that applies
it per unit, on a worker thread for CPU and NVMe states, overlapped with the GPU.

Note [update modes]: without clipping ("eager") a unit is updated as soon as its gradients land, inside
backward, so the CPU AdamW hides under the rest of backward and the next forward. With clip_grad_norm the
global norm is known only after backward ("deferred"): step() computes it from the per-unit sums of
squares and then queues the updates in forward order; each unit's forward waits for its own update. In
both modes a unit with a non-finite gradient is never updated (its moments stay clean). Deferred mode
skips the whole step atomically; eager mode can only skip the units that had not been updated yet when
the non-finite gradient appeared (it warns and step() returns False): pass clip_grad_norm=float("inf")
for the all-or-nothing skip without clipping.

Note [update order]: gradients land last layer first, but the next forward needs the first layer first.
Updated in landing order, the first layer would be updated last and the whole next forward would wait for
the whole CPU AdamW. So the worker runs queued updates lowest unit index (forward order) first: during
backward it takes the most recently landed unit; once backward ends it works up from the first layer
while the next forward follows it unit by unit, and the CPU stays busy through the forward.
"Landed" matters: on a GPU the host issues backward far ahead of the device, so a unit is queued long
before its gradients have crossed the link. Taking the lowest index regardless, the worker blocked on
that unit's copy while others' gradients sat ready: in a traced H200 step the CPU AdamW idled 186 ms of
0.75 s that way (2026-12-02, step 3 of bench/trace_overhead.py). So an update queued with a readiness
test (its gradient copy's event) is taken lowest index first among the ready ones; when none is ready the
worker waits on the one queued first, whose copy, on the one device->host stream, lands first.
"""
import math
import threading
import warnings

import torch

from .adam import host_scalar, unit_adamw_
from .device_update import fill_step, fused_adamw
from .errors import ConfigError
from .store import as_buffer
from .tiers import KIND_H2D


class AdamW(torch.optim.Optimizer):
    """torch.optim.AdamW's arguments and defaults, for offload.engine (which owns parameters and states).

    It is a torch.optim.Optimizer, so torch.optim.lr_scheduler works on it: the learning rate in
    param_groups[0]["lr"] is read at every update. Updates are applied by engine.step() (which calls
    this optimizer's step() as a marker for the schedulers); state_dict() holds the hyperparameters, the
    moments live in the engine's tiers and in its checkpoints.
    """

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None):
        if amsgrad or maximize or differentiable:
            raise ConfigError("offload.AdamW does not support amsgrad, maximize or differentiable; "
                              "drop those arguments")
        if not 0.0 <= lr:
            raise ConfigError(f"AdamW lr={lr}: must be >= 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ConfigError(f"AdamW betas={betas}: each must be in [0, 1)")
        if not 0.0 <= eps:
            raise ConfigError(f"AdamW eps={eps}: must be >= 0")
        if not 0.0 <= weight_decay:
            raise ConfigError(f"AdamW weight_decay={weight_decay}: must be >= 0")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        # The engine binds the real parameters; a placeholder satisfies Optimizer's non-empty check.
        super().__init__([torch.nn.Parameter(torch.zeros(0))], defaults)

    def hyper(self):
        g = self.param_groups[0]
        return (float(g["lr"]), tuple(g["betas"]), float(g["eps"]), float(g["weight_decay"]))

    @torch.no_grad()
    def step(self, closure=None):
        """A marker for LR schedulers: engine.step() applies the update and calls this."""
        return closure() if closure is not None else None

    def zero_grad(self, set_to_none=True):
        """Gradients live in the engine's buffers and are consumed by each update: nothing to do."""

    def state_dict(self):
        return {"param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]}

    def load_state_dict(self, state_dict):
        for g, s in zip(self.param_groups, state_dict["param_groups"]):
            g.update({k: (tuple(v) if k == "betas" else v) for k, v in s.items()})

    def __repr__(self):
        return f"offload.AdamW({self.defaults})"


class Worker:
    """One thread that runs queued closures; an exception is kept and re-raised in the caller's thread at the
    next sync() or submit(), never lost. The heavy calls it makes (native AdamW, store waits, CUDA event
    syncs) release the GIL.

    Order (Note [update order]): a closure submitted with a priority may overtake other prioritised closures
    queued before it, lowest priority first (ties in submission order) among those whose ready() says so (no
    ready: always), else the first submitted; one submitted without a priority is a barrier: it runs after
    everything submitted before it and before everything submitted after it."""

    def __init__(self, name="offload-optim", on_error=None):
        self.on_error = on_error   # called on the worker thread after a failure: must unblock every waiter
        self.queue = []            # (epoch, priority, seq, fn, ready): epochs are separated by barriers
        self.epoch = 0
        self.seq = 0
        self.error = None
        self.pending = 0
        self.cv = threading.Condition()
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def _pick(self):
        """The next closure (Note [update order]); called with the lock held and the queue not empty. A
        barrier is the last of its epoch, so it runs once it is alone there."""
        epoch = min(e[0] for e in self.queue)
        now = [e for e in self.queue if e[0] == epoch]
        waiting = [e for e in now if e[1] != math.inf]
        if not waiting:
            pick = now[0]
        else:
            ready = [e for e in waiting if e[4] is None or e[4]()]
            pick = min(ready) if ready else min(waiting, key=lambda e: e[2])
        self.queue.remove(pick)
        return pick[3]

    def _loop(self):
        while True:
            with self.cv:
                self.cv.wait_for(lambda: self.queue)
                fn = self._pick()
            if fn is None:
                return
            try:
                if self.error is None:
                    fn()
            except BaseException as e:  # surfaced in the caller's thread
                with self.cv:
                    self.error = e
                if self.on_error is not None:
                    self.on_error()
            finally:
                with self.cv:
                    self.pending -= 1
                    self.cv.notify_all()

    def submit(self, fn, priority=None, ready=None):
        """ready: with a priority, a non-blocking test of whether fn can run without waiting (a CUDA event's
        query); None: it can."""
        self.raise_error()
        self._push(fn, priority, ready)

    def _push(self, fn, priority, ready=None):
        with self.cv:
            if fn is not None:
                self.pending += 1
            self.seq += 1
            if priority is None:   # a barrier closes its epoch
                self.queue.append((self.epoch, math.inf, self.seq, fn, None))
                self.epoch += 1
            else:
                self.queue.append((self.epoch, priority, self.seq, fn, ready))
            self.cv.notify_all()

    def sync(self):
        with self.cv:
            self.cv.wait_for(lambda: self.pending == 0)
        self.raise_error()

    def raise_error(self):
        """Raises a failure of the worker thread, once, in the caller's thread. on_error runs again first: a
        caller that cleared an event before its submit() found the failure would otherwise leave that event
        waiting for a closure that was never queued."""
        with self.cv:
            e, self.error = self.error, None
        if e is not None:
            if self.on_error is not None:
                self.on_error()
            raise e

    def close(self):
        if self.thread.is_alive():
            self._push(None, None)
            self.thread.join()


def fill_unchanged(out, master, segments):
    """Writes the current parameters (master in out's dtype, which is what they are: every value a parameter
    ever takes is its master rounded) where no segment updates, for an output buffer written back whole: one
    that shares its bytes with the gradients (copied to the device), or a disk staging slot."""
    at = 0
    for off, n, _ in sorted(segments):
        if off > at:
            out[at:off].copy_(master[at:off])
        at = max(at, off + n)
    if at < out.numel():
        out[at:].copy_(master[at:])


class UnitOptimizer:
    """Applies AdamW to one unit wherever its states live. Stateless apart from the per-parameter step
    counts kept on the unit (torch.optim.AdamW counts steps per parameter, and skips parameters that got
    no gradient: so do we)."""

    def __init__(self, tiers):
        self.tiers = tiers
        self.order, self.last_order = [], []   # units in update order, this step and the last
        self.step_t = None                     # update_device's step count, on the device

    def next_step(self):
        """Called between steps on the worker thread: this step's update order predicts the next."""
        if self.order:
            self.last_order, self.order = self.order, []

    def _expected_next(self, u):
        try:
            i = self.last_order.index(u.index)
        except ValueError:
            return None
        return self.last_order[i + 1] if i + 1 < len(self.last_order) else None

    def _segments(self, u):
        """[(offset, numel, step)] to update, in this rank's slice (u.shard): one segment for the whole slice
        when every trainable param got a gradient and all step counts agree (the common case), else one per
        updated param that meets the slice."""
        st = u.st
        trainable = [s for s in u.slots if s.trainable]
        for i, h in enumerate(st.has_grad):
            if h:
                st.steps[i] += 1
        if all(st.has_grad) and len(set(st.steps)) == 1:
            return [(0, u.shard.train, st.steps[0])]
        segments = []
        for i, s in enumerate(trainable):
            part = u.shard.part(s.offset, s.numel, True) if st.has_grad[i] else None
            if part is not None:
                segments.append((part[2], part[1], st.steps[i]))
        return segments

    def update_host(self, u, grad, hyper, scale):
        """CPU AdamW for a unit whose states are in the arena or on NVMe (runs on the worker thread)."""
        t, st, p = self.tiers, u.st, u.plan
        lr, betas, eps, wd = hyper
        slot = None
        if p.states_home == "nvme":
            slot, master, m, v = t.read_states(u)
        else:
            master, m, v = st.master, st.exp_avg, st.exp_avg_sq
        if p.params_home == "cpu":
            out = st.home
        elif p.params_home == "gpu":
            out = st.out
        else:
            out_slot = t.param_slots.acquire()   # keep the whole slot: it goes back to the ring as it came
            out = out_slot[:u.shard.local * t.itemsize].view(t.dtype)
        segments = self._segments(u)
        if out is st.grad or p.params_home == "nvme":
            # Both are written back whole: the gradient buffer shared with the output, or a reused staging
            # slot holding another unit's old bytes. Where no segment updates, the params are their masters.
            fill_unchanged(out[:master.numel()], master, segments)
        for off, n, step in segments:
            sl = slice(off, off + n)
            unit_adamw_(master[sl], grad[sl], m[sl], v[sl], lr=lr, betas=betas, eps=eps, weight_decay=wd,
                   step=step, out=out[sl], grad_scale=scale)
        if slot is not None:
            t.write_states(u, master, m, v, slot=slot)
        self.order.append(u.index)
        nxt = self._expected_next(u)
        if nxt is not None:
            t.read_states_ahead(t.units[nxt])
        if p.params_home == "gpu":
            if t.cuda:
                with torch.cuda.stream(t.h2d):
                    t.h2d.wait_event(st.compute_done)
                    nbytes = u.shard.train * t.itemsize
                    span = t.prof.begin_work(KIND_H2D, u.index, t.h2d) if t.prof else None
                    u.shard.put_train(st.flat, out, non_blocking=True)
                    if span is not None:
                        t.prof.end_work(span, KIND_H2D, u.index, nbytes, t.h2d)
                    t.count("h2d", nbytes)
                    ev = torch.cuda.Event()
                    ev.record(t.h2d)
                    st.update_event = ev
            else:
                u.shard.put_train(st.flat, out)
            st.stale = t.comm is not None   # the next use gathers the other ranks' slices
        elif p.params_home == "nvme":
            ticket = t.submit_disk(True, st.home_obj, as_buffer(out_slot[:u.shard.train * t.itemsize]), u)
            t.count("disk_write", u.shard.train * t.itemsize)
            t.store.wait(ticket)   # the next forward reads this object: the write must be complete first
            t.param_slots.release(out_slot)

    def update_device(self, u, hyper, scale):
        """AdamW on the compute device (device-tier states), in the caller's stream."""
        st = u.st
        lr, betas, eps, wd = hyper
        g = st.dgrad
        if scale != 1.0:
            g.mul_(host_scalar(0, scale, g.dtype))
        for off, n, step in self._segments(u):
            sl = slice(off, off + n)
            if st.master.device.type == "cpu":
                unit_adamw_(st.master[sl], g[sl], st.exp_avg[sl], st.exp_avg_sq[sl], lr=lr, betas=betas, eps=eps,
                       weight_decay=wd, step=step, out=None)
            else:
                step_t = self.step_t = fill_step(self.step_t, step, g.device)   # calls come on one stream
                fused_adamw(st.master[sl], g[sl], st.exp_avg[sl], st.exp_avg_sq[sl], step_t, hyper)
        u.shard.put_train(st.flat, st.master)
        st.stale = self.tiers.comm is not None


def finite(x):
    return not (math.isnan(x) or math.isinf(x))


def warn_nonfinite(unit_name, skipped_total):
    warnings.warn(f"non-finite gradient in unit {unit_name}: optimizer step skipped "
                  f"({skipped_total} skipped so far)", RuntimeWarning, stacklevel=3)
