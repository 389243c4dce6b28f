"""Saved-tensor policy per block unit: what autograd keeps between a block's forward and its backward.

- "keep": saved tensors stay where autograd put them (the compute device).
- "recompute": only the block's inputs are kept; the first time backward needs a saved tensor, the block's
  forward is re-run (same RNG state, same autocast state) under a capturing hook, and the tensors it saves
  replace the dropped ones in order. Parameters are resident then: the block's backward has acquired them.
- "recompute+offload": as "recompute", but the block's inputs that carry gradients (the hidden states between
  blocks) wait in pinned host memory instead of on the device: out on the device->host stream in forward,
  back on the host->device stream one block ahead in backward (Note [swap-in prefetch]). The device then
  holds no per-block activations at all between forward and backward: what a model whose blocks' inputs
  alone overflow the device needs (GPT-3 175B at 16 x 1024 tokens: 38.7 GB of them).
- "swap": every saved tensor that is not a parameter goes to pinned host memory on the device->host
  stream; backward brings it back on the host->device stream, prefetched one block ahead (Note [swap-in
  prefetch]).
- a float a in (0, 1): the token-wise split of token_split.py: the first a of the tokens of each saved
  tensor are swapped, the rest recomputed, per-token layers recomputing only the dropped rows.
- "auto": per block, keep what fits the device budget; the rest is swapped or recomputed, decided from the
  first step's measured compute, transfer rate and activation size (act_auto.py); "recompute+offload" where
  even the recomputed blocks' inputs would not fit (stream.Streamer._policy).

The policy runs through torch.autograd.graph.saved_tensors_hooks entered in the block's forward pre-hook
and left in its forward hook, so the model's code is untouched and no model gradient-checkpointing flag is
needed.

Note [swap-in prefetch]: scopes that hold host copies form a chain in forward order (each knows the one
created before it). When a block's backward starts, the streamer prefetches that block's copies (if not
already) and those of the block before it, which is the next one backward needs: the copy runs on the
host->device stream under the current block's backward. Each fetched tensor is handed to the compute
stream through an event, and record_stream keeps the allocator from reusing it early.

Note [recompute rng]: a recomputed forward must draw the random numbers the first one drew. The device's
generator (CUDA Philox) is kept as its seed and offset, two Python ints. The host generator's state can only
be read into a new 5 KiB tensor, an allocation per block call per step, so the first recorded call of a
module in a mode (training or eval: an eval-mode dropout draws nothing) compares the host state before and
after its forward, and later calls of that module in that mode keep it only where the forward drew from it
(a CUDA model's blocks rarely do; on a CPU device every dropout does). A block whose forward in one mode
draws host random numbers on later calls but not on its first would recompute with other numbers: give it
activations="keep" or "swap".
"""
import contextlib
import warnings
import weakref

import torch
from torch.utils._pytree import tree_map

from ._native import trace_kind
from .sizes import fmt_bytes, pinned_bytes

POLICIES = ("keep", "recompute", "recompute+offload", "swap", "auto")
KIND_SWAP_OUT = trace_kind.ACT_SWAP_OUT
KIND_SWAP_IN = trace_kind.ACT_SWAP_IN


def check_policy(policy):
    """The policy, or None when it is not one (a float must lie strictly between 0 and 1)."""
    if isinstance(policy, float) and not isinstance(policy, bool):
        return policy if 0.0 < policy < 1.0 else None
    return policy if policy in POLICIES else None


def _capture_autocast(device_type):
    if device_type == "cuda" and torch.is_autocast_enabled("cuda"):
        return ("cuda", torch.get_autocast_dtype("cuda"))
    if torch.is_autocast_enabled("cpu"):
        return ("cpu", torch.get_autocast_dtype("cpu"))
    return None


def _device_generator(device):
    """The default generator of a CUDA device (None on the CPU, whose generator is the host's)."""
    if device.type != "cuda":
        return None
    return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]


def _philox_state(gen):
    """A CUDA generator's whole state, its Philox seed and offset, as Python ints: torch.cuda.get_rng_state
    would make a host tensor of the same 16 bytes per call."""
    return gen.initial_seed(), gen.get_offset()


def _set_philox_state(gen, state):
    gen.manual_seed(state[0])   # resets the offset, so it is set second
    gen.set_offset(state[1])


class HostRngUse:
    """Whether a module's forward in one mode draws from the host (CPU) generator: None until its first
    recorded call has shown it (Note [recompute rng])."""
    __slots__ = ("draws",)

    def __init__(self):
        self.draws = None


class Replay:
    """What re-running one block call needs: its inputs, RNG states and autocast state at the call.
    host_rng: the HostRngUse of the module in its mode (None: the host generator's state is always kept)."""

    def __init__(self, module, args, kwargs, device, on_recompute, host_rng=None):
        self.module, self.args, self.kwargs = module, args, kwargs
        self.device = device
        self.device_gen = _device_generator(device)
        self.device_rng = _philox_state(self.device_gen) if self.device_gen is not None else None
        self.host_rng = host_rng
        keep_host = host_rng is None or host_rng.draws is not False
        self.cpu_rng = torch.get_rng_state() if keep_host else None
        self.autocast = _capture_autocast(device.type)
        self.on_recompute = on_recompute   # context manager factory: marks the engine as recomputing

    def forward_done(self):
        """The call's forward is over: a unit's first call learns whether its forward drew from the host
        generator, and drops the state it kept when it did not."""
        if self.host_rng is None or self.cpu_rng is None or self.host_rng.draws is not None:
            return
        self.host_rng.draws = not torch.equal(torch.get_rng_state(), self.cpu_rng)
        if not self.host_rng.draws:
            self.cpu_rng = None

    def run(self, around=contextlib.nullcontext):
        """Re-runs the call under `around()` and returns the tensors its forward saves, in order."""
        saved = []

        def capture(t):
            # Keep a detached alias, and give the recomputed graph nothing: it is never differentiated, and
            # it saves some of its ops' own outputs; holding those (with their grad_fn) in it would make a
            # reference cycle through autograd's C++ graph that Python's GC cannot break, leaking every
            # recomputed block's activations each step.
            saved.append(t.detach())
            return None

        def detach(x):
            return x.detach().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x

        args, kwargs = tree_map(detach, self.args), tree_map(detach, self.kwargs)
        gen = self.device_gen
        device_now = _philox_state(gen) if gen is not None else None
        host_now = torch.get_rng_state() if self.cpu_rng is not None else None
        try:
            if gen is not None:
                _set_philox_state(gen, self.device_rng)
            if host_now is not None:
                torch.set_rng_state(self.cpu_rng)
            autocast = (torch.autocast(self.autocast[0], dtype=self.autocast[1]) if self.autocast
                        else contextlib.nullcontext())
            with torch.enable_grad(), autocast, self.on_recompute(), around(), \
                    torch.autograd.graph.saved_tensors_hooks(capture, _never_unpacked):
                self.module(*args, **kwargs)
        finally:   # backward goes on from the generators' states as they were before the replay
            if gen is not None:
                _set_philox_state(gen, device_now)
            if host_now is not None:
                torch.set_rng_state(host_now)
        return saved

    def release(self):
        self.args = self.kwargs = None


def structure_error(module, got, want):
    return RuntimeError(f"recompute of {type(module).__name__} saved {got} tensors where the forward saved "
                        f"{want}: its forward is not deterministic in structure; use activations='keep' or "
                        f"'swap' for it")


class RecomputeScope:
    """The saved-tensor hooks of one block call under "recompute"."""

    prev = None

    def __init__(self, module, args, kwargs, device, on_recompute, host_rng=None):
        self.replay = Replay(module, args, kwargs, device, on_recompute, host_rng)
        self.count = 0
        self.saved = None
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def pack(self, t):
        i = self.count
        self.count += 1
        return i

    def unpack(self, i):
        if self.saved is None:
            saved = self.replay.run()
            if len(saved) != self.count:
                raise structure_error(self.replay.module, len(saved), self.count)
            self.saved = saved
            self.replay.release()
        t = self.saved[i]
        self.saved[i] = None   # each saved tensor is unpacked once; free it as soon as it is handed over
        return t

    def exit(self):
        """Nothing was sent out."""
        self.replay.forward_done()

    def prefetch(self):
        """Nothing to bring back: the inputs are on the device."""


class _OnHost:
    """Where a block input sent to the host stood in the call's arguments: its index in the stash."""
    __slots__ = ("index", "requires_grad")

    def __init__(self, index, requires_grad):
        self.index, self.requires_grad = index, requires_grad


class OffloadedRecomputeScope(RecomputeScope):
    """The saved-tensor hooks of one block call under "recompute+offload": a RecomputeScope whose kept
    inputs (those that require grad, the activations flowing between blocks; masks and position tables are
    shared by every block and stay) are in a HostStash until the block's backward re-runs its forward."""

    def __init__(self, module, args, kwargs, device, on_recompute, stash, prev=None, host_rng=None):
        def send(x):
            if isinstance(x, torch.Tensor) and x.requires_grad and x.device.type == device.type:
                return _OnHost(stash.put(x), x.requires_grad)
            return x
        super().__init__(module, tree_map(send, args), tree_map(send, kwargs), device, on_recompute, host_rng)
        self.stash, self.prev = stash, prev

    def unpack(self, i):
        if self.saved is None:   # the inputs come back before the forward re-runs on them
            def fetch(x):
                return self.stash.get(x.index).requires_grad_(x.requires_grad) if isinstance(x, _OnHost) else x
            self.replay.args, self.replay.kwargs = tree_map(fetch, self.replay.args), tree_map(fetch, self.replay.kwargs)
        return super().unpack(i)

    def exit(self):
        super().exit()
        self.stash.sealed()

    def prefetch(self):
        self.stash.prefetch()


def _never_unpacked(_):
    raise RuntimeError("offload: a recomputed block's own graph was differentiated; it is only a source of "
                       "saved tensors")


class HostLedger:
    """Host bytes that activation copies (swap, token-wise split, recompute+offload's block inputs) hold at
    once, against `room`: what cpu_memory leaves beside the arena. The engine places states without knowing
    the batch, so a batch's copies can outgrow that room; the first time they do, one RuntimeWarning names
    the figures and the way out (`offload plan --batch` places states to leave the copies their room)."""

    def __init__(self, room):
        self.room = room        # None: no cpu_memory budget to hold them to
        self.live = self.peak = 0
        self.warned = False

    def add(self, n):
        self.live += n
        self.peak = max(self.peak, self.live)
        if self.room is not None and self.live > self.room and not self.warned:
            self.warned = True
            warnings.warn(f"activation copies hold {fmt_bytes(self.live)} of pinned host memory, more than the "
                          f"{fmt_bytes(max(self.room, 0))} cpu_memory leaves beside the optimizer arena: this process "
                          f"uses more host memory than cpu_memory. `offload plan --batch B --seq S` prints the "
                          f"overrides (activation_host_bytes) that keep the copies room free of optimizer state "
                          f"(more states on the disk), or lower the batch", RuntimeWarning, stacklevel=2)

    def sub(self, n):
        self.live -= n

    def release(self, sizes):
        """A stash's copies that backward never took (sizes: their bytes, 0 for those taken) go with it."""
        self.sub(sum(sizes))
        sizes.clear()


class PinnedPool:
    """Pinned host buffers for activation copies, kept from one step to the next. A step's copies have the
    sizes of the last step's, so in the steady state every copy takes a buffer from here instead of asking
    torch's caching host allocator for one (an allocation per saved tensor per step). Buffers are bucketed
    by pinned_bytes (torch's own 2^k rounding), so the pool pins what torch's cache would have. A buffer
    comes back with the event of the host->device copy that reads it last; the next copy into it is ordered
    after that event on its stream, so no host thread waits. alloc(nbytes) makes a new uint8 buffer."""

    def __init__(self, alloc=None):
        self.alloc = alloc or (lambda n: torch.empty(n, dtype=torch.uint8, pin_memory=True))
        self.free = {}           # pinned size -> [(buffer, event of its last reader or None)]
        self.made = 0            # buffers allocated, ever (a steady state stops adding to it)

    def take(self, nbytes):
        """A buffer of at least nbytes and the event its next writer must wait for (None: none)."""
        bucket = self.free.get(pinned_bytes(nbytes))
        if bucket:
            return bucket.pop()
        self.made += 1
        return self.alloc(pinned_bytes(nbytes)), None

    def give(self, buf, event):
        self.free.setdefault(buf.numel(), []).append((buf, event))


class HostStash:
    """Host copies of one block call's tensors: out on the device->host stream during forward, back on the
    host->device stream when prefetched (Note [swap-in prefetch]). On a CPU device the "host copy" is a
    clone, so the original can be freed and the same code paths run in CI. ledger: a HostLedger counting
    the copies' bytes while the stash lives; pool: the PinnedPool its copies' buffers come from and go back
    to when backward takes them (None: torch's caching host allocator)."""

    def __init__(self, device, d2h, h2d, profiler=None, unit=0, ledger=None, pool=None):
        self.device, self.d2h, self.h2d = device, d2h, h2d
        self.cuda = device.type == "cuda"
        self.host = []      # host tensors
        self.out_events = []
        self.back = None    # device tensors once fetched
        self.back_event = None
        self.nbytes = 0
        self.profiler, self.unit = profiler, unit
        self.t_out = None
        self.ledger = ledger
        self.sizes = []          # bytes each copy holds pinned; 0 once backward took it
        self.pool = pool
        self.bufs = []           # each copy's pool buffer (None without a pool, or once given back)
        if ledger is not None:   # each copy is freed when backward takes it (get); what is left, with the stash
            weakref.finalize(self, ledger.release, self.sizes)

    def put(self, t):
        """Starts the copy of t to the host; returns its index."""
        n = t.numel() * t.element_size()
        self.nbytes += n
        self.sizes.append(pinned_bytes(n) if self.cuda else n)   # the ledger counts what is pinned
        if self.ledger is not None:
            self.ledger.add(self.sizes[-1])
        if not self.cuda:
            if self.profiler and self.t_out is None:
                self.t_out = self.profiler.begin_work(KIND_SWAP_OUT, self.unit)
            self.host.append(t.detach().clone())
            return len(self.host) - 1
        buf = reader = None
        if self.pool is not None:
            buf, reader = self.pool.take(n)
            host = buf[:n].view(t.dtype).view(t.shape)
        else:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        self.bufs.append(buf)
        self.d2h.wait_stream(torch.cuda.current_stream(self.device))
        if reader is not None:   # the buffer's last copy back to the device has read it
            self.d2h.wait_event(reader)
        with torch.cuda.stream(self.d2h):
            if self.profiler and self.t_out is None:   # timed on the copy stream, from the first copy out
                self.t_out = self.profiler.begin_work(KIND_SWAP_OUT, self.unit, self.d2h)
            host.copy_(t, non_blocking=True)
        t.record_stream(self.d2h)   # the allocator must not reuse t's memory before the copy has read it
        self.host.append(host)
        return len(self.host) - 1

    def sealed(self):
        """Forward of the call is over: one event covers every copy out; one trace span for them."""
        if self.cuda and self.host:
            ev = torch.cuda.Event()
            ev.record(self.d2h)
            self.out_events.append(ev)
        if self.profiler and self.t_out is not None:
            self.profiler.end_work(self.t_out, KIND_SWAP_OUT, self.unit, self.nbytes, self.d2h if self.cuda else None)

    def prefetch(self):
        if self.back is not None or not self.host:
            return
        prof = self.profiler
        if not self.cuda:
            t0 = prof.begin_work(KIND_SWAP_IN, self.unit) if prof else None
            self.back = self.host
            if prof:
                prof.end_work(t0, KIND_SWAP_IN, self.unit, self.nbytes)
        else:
            with torch.cuda.stream(self.h2d):
                for ev in self.out_events:
                    self.h2d.wait_event(ev)
                t0 = prof.begin_work(KIND_SWAP_IN, self.unit, self.h2d) if prof else None
                self.back = [h.to(self.device, non_blocking=True) for h in self.host]
                if prof:
                    prof.end_work(t0, KIND_SWAP_IN, self.unit, self.nbytes, self.h2d)
                self.back_event = torch.cuda.Event()
                self.back_event.record(self.h2d)

    def get(self, i):
        self.prefetch()
        t = self.back[i]
        self.back[i] = None
        self.host[i] = None
        if self.ledger is not None:
            self.ledger.sub(self.sizes[i])
        self.sizes[i] = 0
        if self.cuda:
            cur = torch.cuda.current_stream(self.device)
            cur.wait_event(self.back_event)
            t.record_stream(cur)
            if self.bufs[i] is not None:   # its copy back was issued before back_event: reusable after it
                self.pool.give(self.bufs[i], self.back_event)
                self.bufs[i] = None
        return t


class SwapScope:
    """The saved-tensor hooks of one block call under "swap"."""

    def __init__(self, device, stash, param_storages, prev=None):
        self.device, self.stash = device, stash
        self.param_storages = param_storages
        self.prev = prev
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def pack(self, t):
        if t.device.type != self.device.type or t.untyped_storage().data_ptr() in self.param_storages:
            return (None, t)
        return (self.stash.put(t), None)

    def unpack(self, packed):
        i, t = packed
        return t if i is None else self.stash.get(i)

    def exit(self):
        self.stash.sealed()

    def prefetch(self):
        self.stash.prefetch()


def open_scope(policy, module, args, kwargs, *, unit, device, d2h, h2d, profiler, param_storages, on_recompute,
               prev, ledger=None, pool=None):
    """The saved-tensor scope of one block call under `policy` ("keep" and "auto" still undecided: None)."""
    uses = unit.extra.setdefault("host_rng", {})   # Note [recompute rng]: per module and mode
    key = (id(module), module.training)
    host_rng = uses.get(key) or uses.setdefault(key, HostRngUse())
    if policy == "recompute":
        return RecomputeScope(module, args, kwargs, device, on_recompute, host_rng)
    if policy in ("swap", "recompute+offload") or isinstance(policy, float):
        stash = HostStash(device, d2h, h2d, profiler, unit.index, ledger, pool)
        if policy == "recompute+offload":
            return OffloadedRecomputeScope(module, args, kwargs, device, on_recompute, stash, prev, host_rng)
        if policy == "swap":
            return SwapScope(device, stash, param_storages(), prev)
        from .token_split import TokenSplitScope
        return TokenSplitScope(module, args, kwargs, device, policy, stash,
                               unit.extra.setdefault("split_layouts", {}), param_storages(), on_recompute, prev,
                               host_rng)
    return None
