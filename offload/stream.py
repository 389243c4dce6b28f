"""Hooks into the model: bring each unit's parameters to the compute device ahead of use, release them
after, bring them again for backward, and hand each unit's gradients to the optimizer as soon as they are
complete.

Note [unit lifecycle in a step]: a "call" is one forward of one site module of a unit. Its forward
pre-hook acquires the unit (waiting for the prefetch), wraps the call's inputs in _PostBackward (whose
backward runs once everything inside the call has been differentiated) and enters the activation policy;
its forward hook leaves the policy, registers a hook on the outputs' gradients (the call's backward is
about to start) and releases the unit. In backward, the output-gradient hook acquires the unit again and
_PostBackward releases it; when every call of the unit is done its gradients are complete: they are
flattened, copied to the host and queued for the optimizer. Calls whose backward never starts or never
reaches its inputs (inputs without grad, e.g. token ids into an embedding) are finished by a callback at
the end of the backward pass.

Note [prefetch order]: the first step records the sequence of acquisitions (forward and backward); later
steps prefetch the next entries of that sequence: host->device copies `prefetch_depth` ahead and NVMe reads
`disk_prefetch_depth` ahead. A step that departs from the record is still correct (fetch on demand); the
units it prefetched in vain are released at the end of the phase.
"""
import torch
from torch.utils._pytree import tree_flatten

from . import act_auto
from .activations import HostLedger, PinnedPool, open_scope
from .groups import UnitState
from .profiler import KIND_BACKWARD, KIND_FORWARD

AUTO_HEADROOM = 0.25   # of the device budget, left for the head, the loss and backward when "auto" keeps


class _PostBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, call, *tensors):
        ctx.call = call
        return tensors if len(tensors) > 1 else tensors[0]

    @staticmethod
    def backward(ctx, *grads):
        ctx.call.streamer.call_backward_done(ctx.call)
        return (None,) + grads


class _Call:
    __slots__ = ("streamer", "unit", "started", "done", "scope", "t0")

    def __init__(self, streamer, unit):
        self.streamer, self.unit = streamer, unit
        self.started = self.done = False
        self.scope = None


class Streamer:
    def __init__(self, units, tiers, plan, on_unit_grads, profiler=None):
        self.units, self.tiers, self.plan = units, tiers, plan
        self.on_unit_grads = on_unit_grads     # engine callback(unit): gradients of the unit are complete
        self.profiler = profiler
        self.device = tiers.device
        self.cuda = tiers.cuda
        self.phase = "idle"
        self.recomputing = 0
        self.handles = []
        self.seq = {"forward": [], "backward": []}    # recorded acquisition order (Note [prefetch order])
        self.recorded = {"forward": False, "backward": False}
        self.cursor = 0
        self.calls = {}        # unit index -> list of _Call of this step
        self.backward_callback_queued = False
        self.act_decided = {}  # unit index -> policy chosen by "auto"
        self.act_peak = 0
        self.act_adjusted = False
        self.param_storages = set()
        self.current = None    # the unit acquired last: where an out-of-memory error is reported
        self.open_scopes = []  # activation scopes whose saved-tensor hooks are entered (innermost last)
        self.pending_device_bytes = 0   # device bytes promised to states that move there after step 1
        self.on_first_backward = None   # callable(forward seconds) -> device bytes it claims (engine._plan_promotion)
        self.last_scope = None
        cpu = plan.budgets.get("cpu")   # on a CPU device the copies are clones in the same memory as the model
        self.host_ledger = HostLedger(cpu - plan.arena_bytes if cpu is not None and self.cuda else None)
        self.host_pool = PinnedPool() if self.cuda else None   # on a CPU device the copies are clones

    # ---- installation ---------------------------------------------------------------------------------
    def install(self):
        for u in self.units:
            for m in u.sites:
                self.handles.append(m.register_forward_pre_hook(self._make_pre(u), with_kwargs=True))
                self.handles.append(m.register_forward_hook(self._make_post(u), with_kwargs=True))

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _make_pre(self, u):
        def pre(module, args, kwargs):
            if self.recomputing:
                return None
            return self._pre_forward(u, module, args, kwargs)
        return pre

    def _make_post(self, u):
        def post(module, args, kwargs, output):
            if self.recomputing:
                return None
            return self._post_forward(u, output)
        return post

    # ---- phases -------------------------------------------------------------------------------------------
    def begin_forward(self):
        if self.phase == "backward":
            raise RuntimeError("forward called while a backward pass of the engine is still running")
        if self.phase == "forward":
            self.end_forward()  # a forward whose loss was never backpropagated: start over cleanly
        self.phase = "forward"
        self.cursor = 0
        self.calls = {}
        self.current = None
        self.last_scope = None

    def end_forward(self):
        if not self.recorded["forward"] and self.seq["forward"]:
            self.recorded["forward"] = True
        for u in self.units:   # units prefetched in vain (Note [prefetch order])
            if not self.calls.get(u.index):
                self.tiers.release(u)

    def abort(self):
        """A forward or backward that raised (out of memory, a bad input, a failed optimizer update surfacing
        in a gradient hook): the saved-tensor hooks still entered are left in innermost-first order, as a
        stack must be, or every later op on this thread would be saved into a dead scope; each unit's use
        count is cleared, or a unit whose backward never ran would not be given back after its next use; the
        units held are given back and the partial pass is forgotten (with the use order it was recording,
        Note [prefetch order]), so the engine stays usable (a smaller batch, say). Gradients already handed
        to the optimizer stay handed."""
        for scope in reversed(self.open_scopes):
            scope.hooks.__exit__(None, None, None)
        self.open_scopes = []
        for u in self.units:
            u.extra.pop("mem_before", None)
            u.extra.pop("fwd_timer", None)
            if u.extra.get("users"):
                u.extra["users"] = 0
        self.calls = {}
        for phase, recorded in self.recorded.items():
            if not recorded:     # a first pass cut short: its prefix is no order to prefetch by
                self.seq[phase] = []
        self.end_forward()    # no calls left: gives back every unit
        self.phase = "idle"
        self.backward_callback_queued = False

    def begin_backward(self):
        self.end_forward()
        self.phase = "backward"
        self.cursor = 0

    def end_backward(self):
        """Finishes every call whose backward did not complete (Note [unit lifecycle in a step])."""
        for idx, calls in list(self.calls.items()):
            u = self.units[idx]
            if any(not c.done for c in calls):
                for c in calls:
                    if self.profiler and c.started and not c.done:   # its span ends with the backward pass
                        self.profiler.end_work(c.t0, KIND_BACKWARD, u.index)
                    c.done = True
                self._unit_backward_complete(u)
        self.calls = {}
        if not self.recorded["backward"] and self.seq["backward"]:
            self.recorded["backward"] = True
        for u in self.units:
            self.tiers.release(u)
        self.phase = "idle"
        self.backward_callback_queued = False
        self.adjust_after_first_step()

    # ---- acquisition and prefetch ------------------------------------------------------------------------
    def _acquire(self, u, phase):
        self.current = u
        seq = self.seq[phase]
        if self.recorded[phase]:
            c = self.cursor
            depth, ddepth = self.plan.prefetch_depth, self.plan.disk_prefetch_depth
            for j in range(c + 1, min(len(seq), c + 1 + max(depth, ddepth))):
                nxt = self.units[seq[j]]
                if j <= c + depth:
                    self.tiers.fetch(nxt)
                else:
                    self.tiers.prefetch_disk(nxt, ahead=True)
            self.cursor += 1
        else:
            seq.append(u.index)
        self.tiers.wait_ready(u)
        u.extra["users"] = u.extra.get("users", 0) + 1

    def _unuse(self, u):
        u.extra["users"] -= 1
        if u.extra["users"] == 0:
            self.tiers.release(u)

    # ---- forward hooks --------------------------------------------------------------------------------------
    def _pre_forward(self, u, module, args, kwargs):
        if self.phase != "forward":
            self.begin_forward()
        self._acquire(u, "forward")
        call = _Call(self, u)
        if self.profiler:   # after _acquire: on CUDA the compute stream's wait for the params is not compute
            call.t0 = self.profiler.begin_work(KIND_FORWARD, u.index)
        self.calls.setdefault(u.index, []).append(call)
        if torch.is_grad_enabled():
            flat, spec = tree_flatten((args, kwargs))
            idx = [i for i, x in enumerate(flat) if isinstance(x, torch.Tensor) and x.requires_grad]
            if idx:
                outs = _PostBackward.apply(call, *[flat[i] for i in idx])
                outs = outs if isinstance(outs, tuple) else (outs,)
                for i, o in zip(idx, outs):
                    flat[i] = o
                args, kwargs = torch.utils._pytree.tree_unflatten(flat, spec)
            policy = self._policy(u, sum(flat[i].numel() * flat[i].element_size() for i in idx))
            call.scope = open_scope(policy, module, args, kwargs, unit=u, device=self.device, d2h=self.tiers.d2h,
                                    h2d=self.tiers.h2d, profiler=self.profiler, param_storages=self._param_storages,
                                    on_recompute=self._recompute_ctx, prev=self.last_scope, ledger=self.host_ledger,
                                    pool=self.host_pool)
            if call.scope is not None:
                if getattr(call.scope, "stash", None) is not None:
                    self.last_scope = call.scope   # Note [swap-in prefetch]
                call.scope.hooks.__enter__()
                self.open_scopes.append(call.scope)
            if policy == "auto" and self.cuda:
                u.extra["mem_before"] = torch.cuda.memory_allocated(self.device)
            if self.cuda and not self.act_adjusted and u.plan.activations == "auto" and u.kind == "block":
                u.extra["fwd_timer"] = act_auto.start_timer(self.device)   # Note [auto activations]
        return args, kwargs

    def _post_forward(self, u, output):
        calls = self.calls[u.index]
        call = calls[-1]
        if self.profiler:
            self.profiler.end_work(call.t0, KIND_FORWARD, u.index)
        if call.scope is not None:
            call.scope.hooks.__exit__(None, None, None)
            self.open_scopes.remove(call.scope)
            call.scope.exit()
        if "fwd_timer" in u.extra:
            act_auto.stop_timer(u.extra["fwd_timer"], self.device)
        if self._policy(u) == "auto" and self.cuda and "mem_before" in u.extra:
            grown = torch.cuda.memory_allocated(self.device) - u.extra.pop("mem_before")
            self.act_peak = max(self.act_peak, grown)
        if torch.is_grad_enabled():
            tensors = [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
            fired = []

            def on_grad(grad, call=call, fired=fired):
                if not fired:
                    fired.append(True)
                    self._call_backward_start(call)
                return grad
            for t in tensors:
                t.register_hook(on_grad)
        self._unuse(u)
        return output

    # ---- activation policy ------------------------------------------------------------------------------------
    def _policy(self, u, in_bytes=0):
        """The saved-tensor policy of u's call now. in_bytes: the call's gradient-carrying inputs, what
        "recompute" keeps on the device per block."""
        p = u.plan.activations
        if p != "auto":
            return p
        if not self.cuda:
            return "keep"
        if u.index in self.act_decided:
            return self.act_decided[u.index]
        # Keep while the blocks still to come would fit with what has been kept so far, leaving headroom
        # for what runs after the blocks (the head, the loss, backward's own buffers). Once a block is
        # recomputed, the rest are too: keeping the last blocks instead is decided after the first step,
        # from its measured peak (adjust_after_first_step). Blocks that recompute with their inputs in host
        # memory stay so.
        remaining = sum(1 for v in self.units if v.kind == "block" and v.index >= u.index)
        budget = self.plan.budgets.get("gpu")
        used = torch.cuda.memory_allocated(self.device) + self.pending_device_bytes
        choice = "keep"
        decided = set(self.act_decided.values())
        if decided & {"recompute", "recompute+offload"}:
            choice = "recompute+offload" if "recompute+offload" in decided else "recompute"
        elif budget is not None and self.act_peak and \
                used + remaining * self.act_peak + AUTO_HEADROOM * budget > budget:
            choice = "recompute"
        if choice == "recompute" and budget is not None and used + remaining * in_bytes > budget:
            # Even the blocks' inputs alone would not fit (GPT-3 175B at 16 x 1024 tokens on 24 GB): they wait
            # in host memory. Only then: where they fit, plain recompute has the device to itself.
            choice = "recompute+offload"
        if self.act_peak or choice != "keep":
            self.act_decided[u.index] = choice
        return "auto" if choice == "keep" else choice

    @property
    def measures_first_step(self):
        """Whether the first step's device peak decides anything: states waiting to move onto the device, or
        blocks whose activation policy "auto" picks after it."""
        return self.cuda and not self.act_adjusted and (
            self.on_first_backward is not None or any(u.plan.activations == "auto" for u in self.units))

    def adjust_after_first_step(self):
        """After the first backward: the engine's states claim device room first (Note [device states after
        the first step]), then "auto" picks keep / swap / split / recompute per block from what is left
        (Note [auto activations])."""
        if self.act_adjusted and self.on_first_backward is None:
            return
        fwd_s = act_auto.forward_seconds(self) if self.cuda else None   # read once, for both
        claimed = 0
        if self.on_first_backward is not None:
            hook, self.on_first_backward = self.on_first_backward, None
            claimed = hook(fwd_s)
            self.pending_device_bytes = 0
        act_auto.adjust(self, fwd_s, claimed)

    def _recompute_ctx(self):
        streamer = self

        class _Ctx:
            def __enter__(self):
                streamer.recomputing += 1

            def __exit__(self, *a):
                streamer.recomputing -= 1
                return False
        return _Ctx()

    def _param_storages(self):
        return {u.st.flat.untyped_storage().data_ptr() for u in self.units if u.state != UnitState.RELEASED}

    # ---- backward ---------------------------------------------------------------------------------------------
    def _call_backward_start(self, call):
        if self.phase == "forward":
            self.begin_backward()
        if not self.backward_callback_queued:
            self.backward_callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self.end_backward)
        call.started = True
        self._acquire(call.unit, "backward")
        if call.scope is not None:      # Note [swap-in prefetch]
            call.scope.prefetch()
            if call.scope.prev is not None:
                call.scope.prev.prefetch()
        if self.profiler:
            call.t0 = self.profiler.begin_work(KIND_BACKWARD, call.unit.index)

    def call_backward_done(self, call):
        if call.done:
            return
        call.done = True
        u = call.unit
        if call.started:
            if self.profiler:
                self.profiler.end_work(call.t0, KIND_BACKWARD, u.index)
            self._unuse(u)
        if all(c.done for c in self.calls.get(u.index, ())):
            self._unit_backward_complete(u)

    def _unit_backward_complete(self, u):
        if u.trainable:
            self.on_unit_grads(u)
