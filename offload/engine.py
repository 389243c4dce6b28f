"""offload.engine(): wraps an unmodified nn.Module and trains it across the compute device, the pinned
CPU arena and NVMe, with the numbers plain PyTorch would give. Wiring only: the pieces live in groups
(units), plan (placement), tiers (storage and transfers), stream (hooks), optim (AdamW), activations,
checkpoint."""
import math
import os
import weakref

import torch

from . import checkpoint
from .activations import POLICIES, check_policy
from .adam import grad_sumsq
from .errors import BudgetError, ConfigError
from .groups import split_units
from .oom import device_memory_guard
from .optim import AdamW, UnitOptimizer, Worker, finite, warn_nonfinite
from .overrides import parse_overrides
from . import plan as plan_mod
from .device_update import DeviceUpdater, chunk_elems
from . import act_auto
from .machine import cpu_adam_rate, machine_rates
from .profiler import Profiler
from .shard import current_comm
from .sizes import fmt_bytes, parse_size
from .stream import Streamer
from .tiers import KIND_D2H, KIND_H2D, KIND_OPTIM, Tiers
from .weights import Folder, load_units, materialise_buffers, open_source

ACTIVATION_SHARE = plan_mod.ACTIVATION_SHARE   # of gpu_memory, on CUDA, kept for activations (plan.py)


def engine(model, *, optimizer=None, device=None, dtype=None, gpu_memory=None, cpu_memory=None, nvme=None,
           grad_accum=1, clip_grad_norm=None, activations="auto", trace=None, weights=None, overrides=None):
    """Wraps `model` for training. See DESIGN.md "The user's view"; every argument is checked before any
    work starts. weights: where the initial values of a model built on the meta device come from, a Hugging
    Face folder of safetensors shards or an offload.weights.RandomInit; each unit is materialised straight
    into its tiers (Note [meta loading] in weights.py). overrides: planner decisions fixed by the user (a
    unit's homes, prefetch depths, the disk queue depth, the activation and device-AdamW shares); see
    offload/overrides.py."""
    return Engine(model, optimizer=optimizer, device=device, dtype=dtype, gpu_memory=gpu_memory,
                  cpu_memory=cpu_memory, nvme=nvme, grad_accum=grad_accum, clip_grad_norm=clip_grad_norm,
                  activations=activations, trace=trace, weights=weights, overrides=overrides)


def _resolve_device(device):
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device={device!r}: {e}; use 'cuda', 'cuda:N' or 'cpu'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={device!r} but no CUDA device is available; use device='cpu'")
        dev = torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
    elif dev.type != "cpu":
        raise ConfigError(f"device={device!r}: only 'cuda', 'cuda:N' and 'cpu' are supported")
    return dev


def _check_nvme(nvme):
    if nvme is None:
        return None
    paths = [nvme] if isinstance(nvme, (str, os.PathLike)) else list(nvme)
    if not paths:
        return None
    out = []
    for p in paths:
        p = os.path.abspath(os.path.expanduser(os.fspath(p)))
        if not os.path.isdir(p):
            raise ConfigError(f"nvme path {p} does not exist or is not a directory; create it or pass another path")
        _prove_writable(p)
        out.append(p)
    return out


def _prove_writable(path):
    """Creates and removes a private directory in path. os.access() is not enough: it says yes to root on a
    0500 directory and on pseudo-filesystems (/proc, /sys) where nothing can be created."""
    import tempfile
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".offload-check-", dir=path))
    except OSError as e:
        raise ConfigError(f"nvme path {path} is not writable ({e.strerror or e}); pass a directory this user can "
                          f"create files in") from None


def _default_budgets(device, gpu_memory, cpu_memory, local_ranks=1):
    import psutil
    if cpu_memory is None:   # ranks on one host share its memory
        cpu_memory = int(psutil.virtual_memory().available * 0.8) // local_ranks
    if gpu_memory is None and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        gpu_memory = int(free * 0.9)
    return gpu_memory, cpu_memory


def _close_at_exit(ref):
    eng = ref()
    if eng is not None:
        try:
            eng.close()
        except Exception:
            pass


class Engine:
    """The trainer returned by offload.engine(). Use it like the module for forward, then backward(loss)
    and step(); save()/load() checkpoint every tier; close() (or `with`) removes swap files."""

    def __init__(self, model, *, optimizer, device, dtype, gpu_memory, cpu_memory, nvme, grad_accum,
                 clip_grad_norm, activations, trace, weights=None, overrides=None):
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(grad_accum, int) or isinstance(grad_accum, bool) or grad_accum < 1:
            raise ConfigError(f"grad_accum={grad_accum!r}: must be an integer >= 1")
        if clip_grad_norm is not None and not (isinstance(clip_grad_norm, (int, float)) and clip_grad_norm > 0):
            raise ConfigError(f"clip_grad_norm={clip_grad_norm!r}: must be a positive number or None")
        if check_policy(activations) is None:
            raise ConfigError(f"activations={activations!r}: use one of {POLICIES} or a float in (0, 1)")
        optimizer = optimizer if optimizer is not None else AdamW()
        if not isinstance(optimizer, AdamW):
            raise ConfigError("optimizer must be an offload.AdamW (the engine owns parameters and optimizer states)")
        self.device = _resolve_device(device)
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        if self.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ConfigError(f"dtype={self.dtype}: use torch.float32, torch.bfloat16 or torch.float16")
        metas = [n for n, p in model.named_parameters() if p.is_meta]
        if metas and weights is None:
            raise ConfigError(f"parameters on the meta device ({', '.join(metas[:3])}{'...' if len(metas) > 3 else ''}): "
                              f"pass weights=FOLDER (a Hugging Face folder of safetensors shards) or "
                              f"weights=offload.weights.RandomInit(), or materialise the model first")
        self.weights = open_source(weights, model) if weights is not None else None
        # With a torch.distributed group of several ranks every unit is sharded over them (shard.py).
        self.comm = current_comm(self.device)
        shards = self.comm.world if self.comm else 1
        gpu_b, cpu_b = _default_budgets(self.device, parse_size(gpu_memory, "gpu_memory"),
                                        parse_size(cpu_memory, "cpu_memory"),
                                        self.comm.local_world if self.comm else 1)
        nvme_paths = _check_nvme(nvme)

        self.module = model
        config = getattr(model, "config", None)
        if getattr(config, "use_cache", False):
            # A key/value cache is for generation; in training it would also be appended to again when a
            # block is recomputed (Hugging Face turns it off for gradient checkpointing for the same reason).
            config.use_cache = False
        self.optimizer = optimizer
        self.grad_accum = grad_accum
        self.clip_grad_norm = clip_grad_norm
        self.mode = "deferred" if clip_grad_norm is not None else "eager"   # Note [update modes] in optim.py
        self.units = split_units(model, shards=shards)
        self.overrides = parse_overrides(overrides, [u.name for u in self.units],
                                         frozen={u.name for u in self.units if not u.numel_train})
        if self.weights is not None:
            # Matched against the shards' headers and buffers given values now: a folder that does not fit
            # the model is refused before any tier is allocated.
            if isinstance(self.weights, Folder):
                self.weights.match(model, [s.param for u in self.units for s in u.slots])
            materialise_buffers(model, self.weights)
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        # Until the planner knows batch and sequence, a share of the device budget is kept for activations.
        self.plan = self._place(gpu_b, cpu_b, nvme_paths, activations, itemsize, shards)
        self.act_reserve = self.plan.act_reserve
        self.plan.budgets["nvme"] = None
        if nvme_paths and self.plan.bytes["nvme"]:
            self._check_disk_space(nvme_paths)
        self.profiler = Profiler(trace, device=self.device, plan=self.plan) if trace else None
        self.tiers = Tiers(self.units, self.plan, device=self.device, dtype=self.dtype, nvme=nvme_paths,
                           trace=self.profiler, comm=self.comm)
        if self.profiler:
            for u in self.units:
                self.profiler.name_unit(u.index, u.name, u.plan.params_home, u.plan.states_home)
        self._closed = False
        # An engine the user never closed still removes its swap files at a normal interpreter exit: the
        # optimizer thread keeps it alive, so neither __del__ nor the store's destructor would run then.
        # The hook holds only a weak reference (no cycle); close() detaches it.
        self._exit_hook = weakref.finalize(self, _close_at_exit, weakref.ref(self))
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def _place(self, gpu_b, cpu_b, nvme_paths, activations, itemsize, shards):
        """plan.engine_placement: the activation reserve, device-side AdamW where it applies, the share of
        AdamW each side runs; `offload plan` calls the same function, so it prints the plan a run gets."""
        return plan_mod.engine_placement(
            self.units, itemsize=itemsize, device=str(self.device), gpu_budget=gpu_b, cpu_budget=cpu_b,
            nvme=nvme_paths, grad_accum=self.grad_accum, activations=activations, shards=shards,
            eager=self.mode == "eager", sharded=self.comm is not None, rates=lambda: machine_rates(self.device, room=gpu_b),
            overrides=self.overrides)

    def _check_disk_space(self, paths):
        need = self.plan.bytes["nvme"] * (self.comm.local_world if self.comm else 1)   # ranks share the disks
        free = min(os.statvfs(p).f_bavail * os.statvfs(p).f_frsize for p in paths) * len(paths)
        if free < need * 1.02:
            raise BudgetError(f"nvme {', '.join(paths)}: {fmt_bytes(free)} free, the plan puts "
                              f"{fmt_bytes(need)} there (plus 2% headroom); free disk space or raise cpu_memory")

    def _setup(self):
        # Note [device-tier update at landing]: without clipping, accumulation or several ranks, a unit whose
        # states live on the device is updated there as its gradients land, the way the device-side AdamW of
        # arena units is (same conditions: plan.update_staging_bytes), instead of at step() from an fp32
        # gradient buffer of its own. That buffer is a quarter of the unit's device state (4 of 16 bytes an
        # element); without it more units' states fit on the device after the first step, and those updates
        # are ones the host AdamW and the link no longer carry. Eager mode's skip rule is unchanged: a unit
        # updated before a non-finite gradient appears keeps its update (Note [update modes] in optim.py).
        self.updates_at_landing = (plan_mod.DEVICE_TIER_AT_LANDING and self.mode == "eager" and self.grad_accum == 1
                                   and self.comm is None)
        self.tiers.allocate(self.grad_accum, device_grads=not self.updates_at_landing)
        if self.weights is not None:
            load_units(self.units, self.tiers, self.module, self.weights)
        else:
            for u in self.units:
                values = torch.zeros(u.numel, dtype=torch.float32)
                with torch.no_grad():
                    for s in u.slots:
                        values[s.offset:s.offset + s.numel].copy_(s.param.detach().reshape(-1))
                if self.comm is not None:   # rank 0's weights, whatever each rank was initialised with
                    self.comm.broadcast_(values, f"the initial weights of unit '{u.name}'")
                self.tiers.load_initial(u, values)
        for u in self.units:
            self.tiers.bind_params(u)
        for mod in self.module.modules():   # buffers (rotary tables, position ids) live on the compute device
            for name, b in list(mod._buffers.items()):
                if b is not None and b.device != self.device:
                    mod._buffers[name] = b.to(self.device)
        self.optimizer.param_groups[0]["params"] = [s.param for u in self.units for s in u.slots if s.trainable]
        self.unit_opt = UnitOptimizer(self.tiers)
        dev_units = [u.numel_train for u in self.units if u.plan.update_on == "device"]
        self.device_updater = DeviceUpdater(self.device, self.tiers.count, chunk_elems(max(dev_units, default=1)),
                                            chunk_elems(max((u.numel_train for u in self.units), default=1)))
        self._device_updated = []   # units updated on the device this step, with their skip flags
        self._landing_buf = None    # _landing_grads' buffer on a CPU device
        self.worker = Worker(on_error=self._unblock_all)
        self.tiers.check = self.worker.raise_error
        self.streamer = Streamer(self.units, self.tiers, self.plan, self._on_unit_grads, self.profiler)
        self.streamer.install()
        self._peak_reset = False
        self._promoting = []   # units whose states move onto the device when this step ends
        deferred = [u for u in self.units if u.plan.promote]
        if deferred or self._arena_candidates():   # Note [device states after the first step] in plan.py
            self.streamer.pending_device_bytes = sum(self._device_state_bytes(u) for u in deferred)
            self.streamer.on_first_backward = self._plan_promotion
        self.micro = 0
        self.steps_applied = 0
        self.steps_skipped = 0
        self._awaiting_step = False
        self._poisoned = False
        self._final = True
        self.window = 0
        # Note [non-finite check]: the largest gradient magnitude of this step so far (fp32 holds any finite
        # bf16/fp16 magnitude exactly). It is inf or nan exactly when some gradient element is (the inf-norm
        # and maximum propagate nan), so one reduction per unit into a fixed scalar replaces isfinite(),
        # which made four element-wise passes and four temporaries the size of the gradients.
        self._grad_peak = torch.zeros((), dtype=torch.float32, device=self.device)
        self._unit_peak = {}   # gradient dtype -> its 0-dim scratch
        self._inf = torch.full((), math.inf, dtype=torch.float32, device=self.device)
        self._peak_finite = torch.zeros((), dtype=torch.bool, device=self.device)
        self._step_flag = torch.zeros((), dtype=torch.bool, device=self.device)
        self._unit_flags = {}  # unit index -> its 0-dim float flag for the device-side AdamW
        self._sumsq = None     # 0-dim scratch of _device_sumsq on CUDA

    # ---- the training loop ----------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        if self._awaiting_step:
            raise RuntimeError("engine.step() must be called after the last engine.backward() of an "
                               "accumulation window, before the next forward")
        dev = self.device
        args, kwargs = torch.utils._pytree.tree_map(
            lambda x: x.to(dev, non_blocking=True) if isinstance(x, torch.Tensor) and x.device != dev else x,
            (args, kwargs))
        if self.profiler is not None and self.micro % self.grad_accum == 0:
            self.profiler.mark_step(self.micro // self.grad_accum)   # a window's first forward starts a step
        if self.micro == 0 and self.streamer.measures_first_step and not self._peak_reset:
            # The first step's own peak decides what moves onto the device and which blocks keep their
            # activations; the allocator's peak counter also holds whatever ran before (a reference model,
            # another engine), so it is reset here, once (README: the engine resets it at its first forward).
            # The room is read from the reserved peak (act_auto.device_room): cached segments left by that
            # earlier work go back first.
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._peak_reset = True
        self.streamer.begin_forward()
        try:
            with device_memory_guard(self, "forward"):
                out = self.module(*args, **kwargs)
        except BaseException:
            self.streamer.abort()
            raise
        self.streamer.end_forward()
        return out

    forward = __call__

    def backward(self, loss):
        """Backpropagates loss / grad_accum (the mean over the accumulation window, as DeepSpeed and
        accelerate do)."""
        self.window = self.micro // self.grad_accum   # index of the accumulation window this belongs to
        self.micro += 1
        self._final = self.micro % self.grad_accum == 0
        if self.grad_accum > 1:
            loss = loss / self.grad_accum
        self.streamer.begin_backward()
        try:
            with device_memory_guard(self, "backward"):
                loss.backward()
                if self.streamer.phase != "idle":   # no hook fired (nothing required grad): finish by hand
                    self.streamer.end_backward()
        except BaseException:
            self.streamer.abort()
            raise
        self.worker.raise_error()
        if self._final:
            self._awaiting_step = True

    def _on_unit_grads(self, u):
        """Gradients of u are complete for this micro-batch: flatten, copy to the host, queue the optimizer."""
        st, tiers = u.st, self.tiers
        # A unit's first gradients of a window start its accumulator afresh, whichever micro-batch brings them
        # (a sub-module can skip micro-batches).
        first = st.acc_window != self.window
        st.acc_window = self.window
        final = self._final
        if final:
            st.final_window = self.window
        trainable = [s for s in u.slots if s.trainable]
        prof = self.profiler
        views, grads = [], []
        target = st.dgrad if u.plan.states_home == "gpu" else None
        # updated here, as they land: device-side AdamW, or device-tier states without an fp32 gradient buffer
        at_landing = u.plan.update_on == "device" or u.plan.states_home == "gpu" and target is None
        if at_landing:
            target = self._landing_grads(u)
        elif target is None:
            st.grad_free.wait()        # the optimizer has consumed the previous gradients of this unit
            st.grad_free.clear()
            if tiers.cuda:
                target = torch.zeros(u.shard.train, dtype=self.dtype, device=self.device)
            else:
                target = st.grad
                target.zero_()
        elif first:
            target.zero_()
        # Several ranks: the full gradient is flattened, then reduce-scattered into this rank's slice (target).
        # On the CPU flattening into the host buffer is the copy; on CUDA the copy is timed on its stream.
        host_copy = prof is not None and not tiers.cuda and u.plan.states_home != "gpu" and u.plan.update_on == "host"
        t_copy = prof.begin_work(KIND_D2H, u.index) if host_copy else None
        full = target if self.comm is None else torch.zeros(u.numel_train, dtype=self.dtype, device=self.device)
        for i, s in enumerate(trainable):
            g = s.param.grad
            if g is not None:
                st.has_grad[i] = True
                views.append(full[s.offset:s.offset + s.numel].view(s.shape))
                grads.append(g)
                s.param.grad = None
        with torch.no_grad():
            if grads:
                if self.comm is not None:
                    torch._foreach_copy_(views, grads)
                    self.comm.reduce_grads(u, full, target, accumulate=u.plan.states_home == "gpu")
                elif u.plan.states_home == "gpu":
                    torch._foreach_add_(views, grads)
                else:
                    torch._foreach_copy_(views, grads)
                peak = self._unit_peak.get(target.dtype)    # Note [non-finite check]
                if peak is None:
                    peak = self._unit_peak[target.dtype] = torch.zeros((), dtype=target.dtype, device=self.device)
                torch.linalg.vector_norm(target, float("inf"), out=peak)
                torch.maximum(self._grad_peak, peak, out=self._grad_peak)
        if at_landing:
            self._update_on_device(u, target)
            return
        if u.plan.states_home == "gpu":   # updated at step() from its fp32 gradients
            return
        nbytes = u.shard.train * tiers.itemsize
        tiers.count("d2h", nbytes)
        if t_copy is not None:
            prof.end_work(t_copy, KIND_D2H, u.index, nbytes)
        ev = None
        if tiers.cuda:
            st.compute_done = torch.cuda.Event()
            st.compute_done.record()
            tiers.d2h.wait_event(st.compute_done)
            with torch.cuda.stream(tiers.d2h):
                t_copy = prof.begin_work(KIND_D2H, u.index, tiers.d2h) if prof else None
                st.grad.copy_(target, non_blocking=True)
                if t_copy is not None:
                    prof.end_work(t_copy, KIND_D2H, u.index, nbytes, tiers.d2h)
                ev = torch.cuda.Event()
                ev.record(tiers.d2h)
            target.record_stream(tiers.d2h)
        if final:
            st.updated.clear()
        hyper = self.optimizer.hyper()
        self.worker.submit(lambda: self._land(u, ev, first, final, hyper), priority=u.index,
                           ready=ev.query if ev is not None else None)   # Note [update order] in optim.py

    def _landing_grads(self, u):
        """Zeroed compute-dtype gradients of u for its AdamW on the device as they land. On CUDA from the
        caching allocator (the queued update holds them until it has read them); on a CPU device one buffer
        kept for every unit, since the update there runs before the next unit's gradients land."""
        if self.tiers.cuda:
            return torch.zeros(u.numel_train, dtype=self.dtype, device=self.device)
        if self._landing_buf is None:
            self._landing_buf = torch.empty(max(v.numel_train for v in self.units), dtype=self.dtype)
        return self._landing_buf[:u.numel_train].zero_()

    def _update_on_device(self, u, grad):
        """Queues u's AdamW on the device (eager mode, one micro-batch a window: its gradients are final):
        its states streamed through it from the arena, or where they live on the device (Note [device-tier
        update at landing]) on the compute stream. A non-finite gradient anywhere so far this step leaves
        the unit untouched, on the device by the fused kernel's found_inf flag; step() then takes back the
        step counts."""
        st = u.st
        steps_before = list(st.steps)
        segments = self.unit_opt._segments(u)
        st.has_grad = [False] * len(st.has_grad)
        hyper = self.optimizer.hyper()
        prof, upd = self.profiler, self.device_updater
        flag = self._unit_flags.get(u.index)
        if flag is None:
            flag = self._unit_flags[u.index] = torch.zeros((), dtype=torch.float32, device=self.device)
        # This step's flag so far, before the event the update waits on. Kept per unit: step() reads each
        # unit's own; the next step's write is ordered after this update, which the unit's forward waits for.
        flag = self._found_inf(flag)
        if self.tiers.cuda and u.plan.states_home == "gpu":
            t0 = prof.begin_work(KIND_OPTIM, u.index) if prof else None
            upd.update_resident(u, grad, segments, hyper, found_inf=flag)
            if t0 is not None:
                prof.end_work(t0, KIND_OPTIM, u.index, u.numel_train * 16)
        elif self.tiers.cuda:   # issued as the gradients land: Note [device-side update order] in device_update.py
            ready = torch.cuda.Event()
            ready.record()
            upd.load.wait_event(ready)   # here, not in update(): the traced span starts once the gradients are in
            t0 = prof.begin_work(KIND_OPTIM, u.index, upd.load) if prof else None
            st.update_event = upd.update(u, grad, segments, hyper, found_inf=flag, prof=prof)
            if t0 is not None:
                prof.end_work(t0, KIND_OPTIM, u.index, u.numel_train * 24, upd.load)
        else:
            if not bool(flag):
                upd.update(u, grad, segments, hyper)
        self._device_updated.append((u, flag, steps_before))


    def _land(self, u, ev, first, final, hyper, fresh=True):
        """Worker thread: gradients of u have (or will have, after ev) landed in its host buffer; with
        fresh=False there are no new ones and the window's accumulated gradients are finalised."""
        st = u.st
        if ev is not None:
            ev.synchronize()
        if self.grad_accum > 1:
            if fresh:
                if first:
                    st.acc.copy_(st.grad)
                else:
                    st.acc.add_(st.grad)
            st.grad_free.set()
        g = self._host_grad(u)
        if not final:
            return
        st.sumsq = grad_sumsq(g)
        if self.mode == "deferred":
            return
        if self._poisoned or not finite(st.sumsq):
            if not self._poisoned:
                warn_nonfinite(u.name, self.steps_skipped + 1)
            self._poisoned = True
            self._finish_unit(u)
            return
        self._update_host(u, g, hyper, 1.0)

    def _host_grad(self, u):
        """The host gradients an update of u consumes: the window's fp32 accumulator, or the landed buffer."""
        return u.st.acc if self.grad_accum > 1 else u.st.grad

    def _update_host(self, u, g, hyper, scale):
        t0 = self.profiler.begin(KIND_OPTIM, u.index) if self.profiler else 0
        self.unit_opt.update_host(u, g, hyper, scale)
        if self.profiler:
            self.profiler.record(KIND_OPTIM, u.index, u.shard.train * 16, t0)
        self._finish_unit(u)

    def _update_device(self, u, hyper, scale):
        t0 = self.profiler.begin_work(KIND_OPTIM, u.index) if self.profiler else None
        self.unit_opt.update_device(u, hyper, scale)
        if t0 is not None:
            self.profiler.end_work(t0, KIND_OPTIM, u.index, u.shard.train * 16)

    def _unblock_all(self):
        """After a worker failure nothing may wait for an update that will never come."""
        for u in self.units:
            if getattr(u, "st", None) is not None:
                u.st.updated.set()
                u.st.grad_free.set()

    def _finish_unit(self, u):
        st = u.st
        st.has_grad = [False] * len(st.has_grad)
        st.grad_free.set()
        st.updated.set()

    def step(self):
        """Applies the update when the accumulation window closes (returns True then; False inside a window
        or when a non-finite gradient skipped the step)."""
        if not self._awaiting_step:
            return False
        with device_memory_guard(self, "step"):
            applied = self._step()
            if self._promoting:
                self._promote_states()
            return applied

    # ---- device states after the first step (Note [device states after the first step] in plan.py) ---------
    def _plan_promotion(self, fwd_s):
        """Called once, after the first backward: picks the deferred units whose states move onto the
        device, in placement order, while the measured peak leaves room under gpu_memory and, where "auto"
        could use that room for activations instead, while the CPU AdamW would not hide under backward.
        fwd_s: the first step's forward compute (act_auto.forward_seconds), None where nothing was timed.
        Returns the device bytes they claim; the rest become CPU-state units for good."""
        deferred = [u for u in self.units if u.plan.promote]
        budget = self.plan.budgets["gpu"]
        room = act_auto.device_room(budget, self.device)
        auto = any(u.plan.activations == "auto" for u in self.units if u.kind == "block")
        fwd_s = fwd_s if auto else None
        hides_s = act_auto.backward_hides_s(fwd_s) if fwd_s else None
        host = sum(p.numel_train // p.shards for p in self.plan.units
                   if p.states_home in ("cpu", "nvme") and p.update_on == "host")
        rate = cpu_adam_rate(self.device) if hides_s is not None else None

        def cpu_hides():   # the CPU AdamW left on the host already hides under backward
            return hides_s is not None and host / rate <= hides_s

        def fits(u):       # the room the first step's peak left, claimed by each unit that moves
            nonlocal room
            need = self._device_state_bytes(u)
            if need > room:
                return False
            room -= need
            return True
        self._promoting, host = plan_mod.promoted_states(deferred, host, rate, hides_s, lambda u: u.shard.train, fits)
        extra = []
        if len(self._promoting) == len(deferred):   # room left: the arena's units, first used first
            on_cpu = lambda u: u.plan.update_on == "host"   # noqa: E731
            extra, host = plan_mod.promoted_states(self._arena_candidates(), host, rate, hides_s,
                                                   lambda u: u.shard.train if on_cpu(u) else 0, fits, on_cpu)
        claimed = sum(self._device_state_bytes(u) for u in self._promoting + extra)
        chosen = {id(u) for u in self._promoting + extra}
        for u in deferred + extra:   # marked until they move in step(): the activation plan made in between
            u.plan.promote = id(u) in chosen   # prices their state traffic where it is headed
        state_bytes = lambda us: sum(u.shard.train * plan_mod.STATE_BYTES for u in us)   # noqa: E731
        rest = len(deferred) - len(self._promoting)
        if deferred and not rest:
            why = "all fit"
        elif cpu_hides():
            why = (f"the CPU AdamW of the rest ({host / rate:.3f} s) hides under backward ({hides_s:.3f} s), so "
                   f"the device room goes to activations")
        else:
            why = f"{fmt_bytes(max(room, 0))} of gpu_memory was left at the first step's peak"
        follow = (f"the states of {len(extra)} arena units follow ({fmt_bytes(state_bytes(extra))}: "
                  f"{', '.join(u.name for u in extra)})")
        if deferred:
            note = (f"states of {len(self._promoting)} of {len(deferred)} gpu* units "
                    f"({fmt_bytes(state_bytes(self._promoting))}) move to the device; {why}"
                    + (f"; {follow}" if extra else ""))
        else:
            note = follow + " onto the device" if extra else f"no arena unit's states move to the device; {why}"
        self.plan.notes.append("after the first step: " + note)
        self._promoting += extra
        return claimed

    def _device_state_bytes(self, u):
        """Device bytes u's states take once they move there (Note [device-tier update at landing])."""
        return plan_mod.device_state_bytes(u.shard.train, grads=not self.updates_at_landing)

    def _arena_candidates(self):
        """Units whose states may follow the deferred ones onto the device where the first step's peak left
        room (Note [device states after the first step]): states in the arena, parameters resident on the
        device, one rank, in forward order (the next forward needs the first units' updates first, and
        backward finishes them last; on the device their update comes off the host's and the link's queue)."""
        if not (self.tiers.cuda and plan_mod.PROMOTE_ARENA_UNITS and self.comm is None):
            return []
        fixed = {n for n, (_, states) in self.overrides.units.items() if states}   # the user's word stands
        return sorted((u for u in self.units if u.trainable and u.plan.states_home == "cpu" and not u.plan.promote
                       and u.plan.params_home == "gpu" and u.plan.shards == 1 and u.name not in fixed),
                      key=lambda u: u.index)

    def _promote_states(self):
        """Moves the chosen units' master/m/v from the arena onto the device once their CPU updates landed;
        their arena bytes stay held (the arena is one region), their updates run on the device from now."""
        self.worker.sync()
        self.worker.raise_error()
        if any(u.plan.update_on == "device" for u in self._promoting):
            torch.cuda.synchronize(self.device)   # their device-side updates write the arena states back
        # The step's cached segments go back first, so the states get segments of their own instead of being
        # carved out of the large ones the next step's activations and logits need whole.
        torch.cuda.empty_cache()
        prof = self.profiler
        for u in self._promoting:
            st, p = u.st, u.plan
            nbytes = u.shard.train * plan_mod.STATE_BYTES
            t_copy = prof.begin_work(KIND_H2D, u.index) if prof else None
            with torch.no_grad():
                st.master, st.exp_avg, st.exp_avg_sq = (t.to(self.device) for t in (st.master, st.exp_avg,
                                                                                   st.exp_avg_sq))
                if not self.updates_at_landing:
                    st.dgrad = torch.zeros(u.shard.train, dtype=torch.float32, device=self.device)
            if t_copy is not None:
                prof.end_work(t_copy, KIND_H2D, u.index, nbytes)
            st.grad = st.acc = st.out = None
            p.states_home, p.update_on, p.promote = "gpu", "host", False   # update_on: arena states only
            self.plan.bytes["gpu"] += nbytes
            self.plan.bytes["cpu"] -= nbytes
            self.tiers.count("h2d", nbytes)
            if prof:
                prof.name_unit(u.index, u.name, p.params_home, p.states_home)
        self._promoting = []

    def _found_inf(self, out=None):
        """A 0-dim tensor on the device, out (any dtype) or a bool scratch, that says whether a gradient of
        this step so far was inf or nan (Note [non-finite check]): the peak is not below inf exactly then.
        Written with out= ops into kept tensors, so the check allocates nothing."""
        torch.lt(self._grad_peak, self._inf, out=self._peak_finite)
        return torch.logical_not(self._peak_finite, out=self._step_flag if out is None else out)

    def _step(self):
        """step() once an accumulation window has closed."""
        self._awaiting_step = False
        self.optimizer.step()      # a marker for LR schedulers
        found_inf = bool(self._found_inf().item())
        self._grad_peak.zero_()
        if self.comm is not None:   # Note [global skip] in shard.py
            found_inf = self.comm.all_sum([float(found_inf)], "the non-finite gradient flag")[0] > 0
        hyper = self.optimizer.hyper()
        w = self.window
        host = [u for u in self.units if u.trainable and u.plan.states_home != "gpu" and u.st.acc_window == w]
        dev = [u for u in self.units if u.trainable and u.plan.states_home == "gpu" and u.st.acc_window == w]
        for u in host:
            if u.st.final_window != w:   # gradients came only from earlier micro-batches of the window
                u.st.final_window = w
                u.st.updated.clear()
                self.worker.submit(lambda u=u: self._land(u, None, False, True, hyper, fresh=False),
                                   priority=u.index)
        if self.mode == "deferred":
            self.worker.sync()
            total = sum(u.st.sumsq for u in host)
            total += sum(self._device_sumsq(u.st.dgrad) for u in dev)
            if self.comm is not None:
                total = self.comm.all_sum([total], "the squared gradient norm")[0]
            if found_inf or not finite(total):
                first_bad = next((u.name for u in host if not finite(u.st.sumsq)), dev[0].name if dev else "?")
                self.steps_skipped += 1
                warn_nonfinite(first_bad, self.steps_skipped)
                for u in host + dev:
                    self._finish_unit(u)
                return False
            scale = 1.0
            if self.clip_grad_norm is not None:
                scale = min(1.0, self.clip_grad_norm / (math.sqrt(total) + 1e-6))
            for u in dev:
                self._update_device(u, hyper, scale)
                self._finish_unit(u)
            for u in host:     # forward order: the next forward waits for each unit's own update only
                self.worker.submit(lambda u=u: self._update_host(u, self._host_grad(u), hyper, scale),
                                   priority=u.index)
            self.worker.submit(self.unit_opt.next_step)
            self.steps_applied += 1
            return True
        # eager: host units were updated as their gradients landed (Note [update modes]).
        device_updated, self._device_updated = self._device_updated, []
        if found_inf:
            flagged = [u for u, flag, _ in device_updated if bool(flag)]
            for u, flag, steps_before in device_updated:
                if bool(flag):          # its update was skipped: it did not take a step
                    u.st.steps = steps_before
            self.worker.sync()
            if not self._poisoned:   # the CPU AdamW saw only finite gradients, so it did not warn
                warn_nonfinite(self._first_nonfinite(flagged, dev), self.steps_skipped + 1)
            self.steps_skipped += 1
            for u in dev:
                self._finish_unit(u)
            self.worker.submit(lambda: setattr(self, "_poisoned", False))
            return False
        for u in dev:
            if u.st.dgrad is not None:   # else updated as its gradients landed
                self._update_device(u, hyper, 1.0)
            self._finish_unit(u)
        self.worker.submit(self.unit_opt.next_step)
        self.steps_applied += 1
        return True

    def _device_sumsq(self, g):
        """Sum of squares of a device-tier unit's fp32 gradients without a temporary the size of them: the
        native double kernel on a CPU device; on CUDA the fp32 norm into a kept scalar (torch's own
        clip_grad_norm_ takes fp32 norms of fp32 gradients; a float64 norm would cast a copy first)."""
        if g.device.type == "cpu":
            return grad_sumsq(g)
        if self._sumsq is None:
            self._sumsq = torch.zeros((), dtype=torch.float32, device=g.device)
        torch.linalg.vector_norm(g, 2, out=self._sumsq)
        return float(self._sumsq) ** 2

    @staticmethod
    def _first_nonfinite(flagged, dev):
        """The unit to name for a skipped eager step the CPU AdamW did not see: the first unit updated on
        the device with the flag set, else the first, in backward order, of the device-tier units whose
        gradients are non-finite (a host sync, on this rare path only)."""
        if flagged:
            return flagged[0].name
        bad = [u for u in reversed(dev) if u.st.dgrad is not None and not bool(torch.isfinite(u.st.dgrad).all())]
        return bad[0].name if bad else "?"

    def zero_grad(self, set_to_none=True):
        """Gradients are consumed by each update; kept for drop-in loops."""

    # ---- state ---------------------------------------------------------------------------------------------------
    def sync(self):
        """Waits for every queued update and transfer."""
        self.worker.sync()
        if self.tiers.cuda:
            torch.cuda.synchronize(self.device)

    def state_dict(self):
        """Full-precision weights (fp32 masters; frozen params upcast) as CPU tensors under the model's keys.
        With several ranks every rank must call it (the shards are gathered) and every rank gets the whole."""
        self.sync()
        values = {}
        for u in self.units:
            compute, master, _, _ = self.tiers.read_unit(u)
            if self.comm is not None:   # a collective: every rank calls state_dict()
                compute, master = self.comm.gather_unit(u, compute, master)
            for s in u.slots:
                src = master if s.trainable else compute
                values[s.param] = src[s.offset:s.offset + s.numel].float().view(s.shape).clone()
        out = {}
        for k, v in self.module.state_dict(keep_vars=True).items():
            out[k] = values[v] if v in values else v.detach().cpu().clone()
        return out

    def save(self, directory):
        checkpoint.save(self, directory)

    def load(self, directory):
        checkpoint.load(self, directory)

    def save_pretrained(self, directory, **kwargs):
        checkpoint.save_pretrained(self, directory, **kwargs)

    def close(self):
        if getattr(self, "_closed", True):
            return
        self._closed = True
        if hasattr(self, "_exit_hook"):
            self._exit_hook.detach()
        # A failure of the optimizer thread not yet raised to the caller is raised here, but only after every
        # piece is released: hooks off the user's module, profiler, swap files and arena.
        try:
            if hasattr(self, "worker"):
                try:
                    self.worker.sync()
                finally:
                    self.worker.close()
        finally:
            try:
                if hasattr(self, "streamer"):
                    self.streamer.remove()
                if self.profiler is not None:
                    self.profiler.close()
            finally:
                self.tiers.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self):
        return f"offload.Engine({type(self.module).__name__}, device={self.device}, dtype={self.dtype})\n{self.plan}"
