"""Storage of every unit on its tiers, and the byte movements between them.

Per unit (plan.UnitPlan says where):
- flat: the compute-dtype parameters on the compute device. The module's parameters are views of it, set
  once at setup; a streamed unit frees it by resizing its storage to 0 and refills the same storage on the
  next fetch, so the views (and whatever autograd saved from them) stay valid. See Note [storage resize].
- home: the compute-dtype parameters' resting copy when not resident: an arena tensor or an NVMe object.
- master / exp_avg / exp_avg_sq: fp32 over the trainable prefix, on the device (tier "gpu"), in the arena,
  or one NVMe object laid out [master | m | v].
- grad: where gradients land on the host (compute dtype), acc: an fp32 accumulator when grad_accum > 1,
  out: the CPU AdamW's output for device-resident params (copied to the device after the update).

Note [storage resize]: this is FSDP's flat-parameter technique. Allocation of a streamed flat happens on
the host->device stream; before the storage is freed it is recorded on the compute stream, so the caching
allocator cannot hand the block out again while compute kernels that read it are still queued.
"""
import threading
import warnings
from collections import deque
from dataclasses import dataclass, field

import torch

from . import _native
from .arena import HostArena
from .groups import UnitState
from .store import as_buffer, open_store


_now = _native.now_ns
KIND_H2D, KIND_D2H, KIND_OPTIM, KIND_WAIT = (_native.trace_kind.H2D, _native.trace_kind.D2H,
                                             _native.trace_kind.OPTIM, _native.trace_kind.WAIT)


@dataclass(eq=False)
class UnitStorage:
    flat: torch.Tensor = None
    home: torch.Tensor = None
    home_obj: int = None
    master: torch.Tensor = None
    exp_avg: torch.Tensor = None
    exp_avg_sq: torch.Tensor = None
    states_obj: int = None
    grad: torch.Tensor = None
    acc: torch.Tensor = None
    out: torch.Tensor = None
    dgrad: torch.Tensor = None          # device fp32 gradient (device-tier optimizer)
    ready_event: object = None          # host->device copy of flat done
    disk_ticket: object = None          # Pending NVMe read of the params
    disk_slot: object = None
    states_write: object = None         # Pending NVMe write of the states
    update_event: object = None         # device copy of the CPU AdamW output done
    grad_event: object = None           # device->host gradient copy done
    compute_done: object = None         # compute stream passed the unit's backward
    updated: threading.Event = field(default_factory=lambda: _set_event())     # no optimizer update pending
    grad_free: threading.Event = field(default_factory=lambda: _set_event())   # host gradient buffer consumed
    steps: list = None                  # AdamW step count per trainable parameter
    has_grad: list = None               # which trainable params got a gradient in this window
    sumsq: float = 0.0
    acc_window: int = -1                # accumulation window of the latest gradients
    final_window: int = -1              # window whose gradients were finalised for the update


def _set_event():
    e = threading.Event()
    e.set()
    return e


class Pending:
    """One store ticket, waited at most once however many holders wait on it (the store forgets a ticket
    once waited)."""
    __slots__ = ("store", "ticket", "lock")

    def __init__(self, store, ticket):
        self.store, self.ticket, self.lock = store, ticket, threading.Lock()

    def wait(self):
        with self.lock:
            if self.ticket is not None:
                t, self.ticket = self.ticket, None
                self.store.wait(t)


class SlotRing:
    """Fixed host staging buffers for NVMe traffic. A slot is handed back with the I/O ticket or CUDA
    event that still uses it; reuse waits for that (back-pressure, never an error)."""

    def __init__(self, arena, count, nbytes, store):
        self.store = store
        self.free = deque(arena.tensor(nbytes, torch.uint8) for _ in range(count)) if count and nbytes else deque()
        self.busy = deque()   # (slot, ticket or None, event or None)
        self.lock = threading.Lock()

    def acquire(self):
        with self.lock:
            if self.free:
                return self.free.popleft()
            slot, ticket, event = self.busy.popleft()
        if ticket is not None:
            ticket.wait()
        if event is not None:
            event.synchronize()
        return slot

    def release(self, slot, ticket=None, event=None):
        with self.lock:
            if ticket is None and event is None:
                self.free.append(slot)
            else:
                self.busy.append((slot, ticket, event))


class Tiers:
    def __init__(self, units, plan, *, device, dtype, nvme, trace=None):
        self.units, self.plan, self.device, self.dtype = units, plan, device, dtype
        self.itemsize = torch.empty((), dtype=dtype).element_size()
        self.cuda = device.type == "cuda"
        self.h2d = torch.cuda.Stream(device) if self.cuda else None
        self.d2h = torch.cuda.Stream(device) if self.cuda else None
        arena_bytes = plan.arena_bytes
        self.arena = HostArena(max(arena_bytes, 4096), pin=self.cuda) if arena_bytes else None
        uses_disk = any(p.params_home == "nvme" or p.states_home == "nvme" for p in plan.units)
        self.prof = trace   # a profiler.Profiler or None
        self.store = open_store(nvme, queue_depth=32, trace=trace.ring if trace else None) if uses_disk else None
        max_state = max((u.numel_train * 12 for u, p in zip(units, plan.units) if p.states_home == "nvme"), default=0)
        max_param = max((u.numel * self.itemsize for u, p in zip(units, plan.units) if p.params_home == "nvme"),
                        default=0)
        if self.store is not None and self.arena is not None and self.store.backend == "io_uring":
            # Fixed buffers: io_uring then skips pinning/mapping each page of every request. The arena is one
            # region, so one registration covers every slot and home; refusal (RLIMIT_MEMLOCK) only costs
            # that speed-up, and plain reads and writes are used.
            region = self.arena.native.region(0, self.arena.budget)
            if not self.store.register_buffer(region):
                warnings.warn("offload: io_uring could not register the host arena as fixed buffers "
                              "(locked-memory limit?); using plain reads and writes", RuntimeWarning)
        self.state_slots = SlotRing(self.arena, plan.state_slots if max_state else 0, max_state, self.store)
        self.states_ahead = None   # (unit, slot, Pending): Note [state read-ahead]
        self.param_slots = SlotRing(self.arena, plan.param_slots if max_param else 0, max_param, self.store)
        self.grad_accum = 1
        self.check = lambda: None   # raises a failure of the optimizer thread in the caller (set by the engine)
        self.moved = {"h2d": 0, "d2h": 0, "disk_read": 0, "disk_write": 0}   # bytes, for summaries
        for u, p in zip(units, plan.units):
            u.st = UnitStorage()
            u.plan = p

    # ---- setup ---------------------------------------------------------------------------------------
    def allocate(self, grad_accum):
        self.grad_accum = grad_accum
        for u in self.units:
            self._allocate_unit(u)

    def _host(self, numel, dtype):
        return self.arena.tensor(numel, dtype)

    def _allocate_unit(self, u):
        st, p, dev = u.st, u.plan, self.device
        if p.params_home == "gpu":
            st.flat = torch.zeros(u.numel, dtype=self.dtype, device=dev)
        else:
            # Born released (Note [storage resize]): allocating every streamed unit's flat here, even for a
            # moment, would need the whole model on the compute device at once.
            st.flat = torch.empty(u.numel, dtype=self.dtype, device=dev)
            st.flat.untyped_storage().resize_(0)
        if p.params_home == "cpu":
            st.home = self._host(u.numel, self.dtype)
        elif p.params_home == "nvme":
            st.home_obj = self.store.create(u.numel * self.itemsize)
        n = u.numel_train
        if n:
            st.steps = [0] * sum(1 for s in u.slots if s.trainable)
            st.has_grad = [False] * len(st.steps)
            if p.states_home == "gpu":
                st.master, st.exp_avg, st.exp_avg_sq = (torch.zeros(n, dtype=torch.float32, device=dev)
                                                        for _ in range(3))
                st.dgrad = torch.zeros(n, dtype=torch.float32, device=dev)
            else:
                if p.states_home == "cpu":
                    st.master, st.exp_avg, st.exp_avg_sq = (self._host(n, torch.float32) for _ in range(3))
                else:
                    st.states_obj = self.store.create(n * 12)
                st.grad = self._host(n, self.dtype)
                if self.grad_accum > 1:
                    st.acc = self._host(n, torch.float32)
                if p.params_home == "gpu":
                    st.out = self._host(n, self.dtype)

    def load_initial(self, u, values):
        """values: fp32 CPU flat of u.numel holding the unit's parameters (padding zero); moments start at 0."""
        n = u.numel_train
        zeros = torch.zeros(n, dtype=torch.float32)
        self.write_unit(u, values, values[:n], zeros, zeros)

    def bind_params(self, u):
        """Points every parameter of the unit at its view of the flat buffer (setup only)."""
        st = u.st
        storage = st.flat.untyped_storage()
        if storage.nbytes() == 0:   # views are checked against the storage's size: give it one unit, briefly
            storage.resize_(u.numel * self.itemsize)
        for s in u.slots:
            s.param.data = st.flat[s.offset:s.offset + s.numel].view(s.shape)
        if u.plan.params_home != "gpu":
            st.flat.untyped_storage().resize_(0)
            u.state = UnitState.RELEASED
        else:
            u.state = UnitState.READY

    # ---- NVMe helpers ----------------------------------------------------------------------------------
    def write_params(self, u, compute_flat, length=None):
        """Synchronous write of compute-dtype params (setup, checkpoint load)."""
        slot = self.param_slots.acquire()
        nb = (length if length is not None else u.numel) * self.itemsize
        slot[:nb].copy_(compute_flat[:nb // self.itemsize].view(torch.uint8))
        self.store.wait(self.store.submit_write(u.st.home_obj, 0, as_buffer(slot[:nb])))
        self.param_slots.release(slot)

    def read_states(self, u):
        """[master | m | v] of an NVMe-state unit in a staging slot: (slot, master, m, v) views. Uses the
        read-ahead when it is for u (Note [state read-ahead])."""
        ahead = self.states_ahead
        if ahead is not None and ahead[0] is u:
            self.states_ahead = None
            slot, pending = ahead[1], ahead[2]
            pending.wait()
        else:
            slot, pending = self._read_states_into(u, self.state_slots.acquire())
            pending.wait()
        n = u.numel_train
        f = slot[:n * 12].view(torch.float32)
        return slot, f[:n], f[n:2 * n], f[2 * n:]

    def _read_states_into(self, u, slot):
        st = u.st
        if st.states_write is not None:   # the previous update's write-behind must land first
            st.states_write.wait()
            st.states_write = None
        n = u.numel_train
        pending = Pending(self.store, self.store.submit_read(st.states_obj, 0, as_buffer(slot[:n * 12]), tag=u.index))
        self.moved["disk_read"] += n * 12
        return slot, pending

    def read_states_ahead(self, u):
        """Note [state read-ahead]: while the backward pass computes the next unit's gradients, its states
        are read from disk into the second staging slot, so its update starts on data already in memory.
        At most one read-ahead is outstanding; one that is not used (the step went another way) is dropped
        before the slot is needed, and before any other write of that unit's states."""
        if self.states_ahead is not None or u.plan.states_home != "nvme":
            return
        slot, pending = self._read_states_into(u, self.state_slots.acquire())
        self.states_ahead = (u, slot, pending)

    def drop_states_ahead(self):
        ahead, self.states_ahead = self.states_ahead, None
        if ahead is not None:
            ahead[2].wait()
            self.state_slots.release(ahead[1])

    def write_states(self, u, master, exp_avg, exp_avg_sq, wait=False, slot=None):
        st, n = u.st, u.numel_train
        if slot is None:
            slot = self.state_slots.acquire()
            f = slot[:n * 12].view(torch.float32)
            f[:n].copy_(master)
            f[n:2 * n].copy_(exp_avg)
            f[2 * n:].copy_(exp_avg_sq)
        ticket = Pending(self.store, self.store.submit_write(st.states_obj, 0, as_buffer(slot[:n * 12]), tag=u.index))
        self.moved["disk_write"] += n * 12
        if wait:
            ticket.wait()
            self.state_slots.release(slot)
        else:
            st.states_write = ticket
            self.state_slots.release(slot, ticket=ticket)

    # ---- compute-side residency --------------------------------------------------------------------------
    def prefetch_disk(self, u):
        st = u.st
        if u.plan.params_home != "nvme" or st.disk_ticket is not None or u.state != UnitState.RELEASED:
            return
        st.updated.wait()
        slot = self.param_slots.acquire()
        st.disk_slot = slot
        st.disk_ticket = Pending(self.store, self.store.submit_read(st.home_obj, 0, as_buffer(slot[:u.numel * self.itemsize]),
                                                                    tag=u.index))
        self.moved["disk_read"] += u.numel * self.itemsize

    def fetch(self, u):
        """Starts making u.flat valid on the compute device (asynchronous on CUDA)."""
        if u.state != UnitState.RELEASED:
            return
        st = u.st
        t0 = _now() if self.prof else 0
        st.updated.wait()      # the optimizer must have written this unit's new values first
        if u.plan.params_home == "nvme":
            if st.disk_ticket is None:
                self.prefetch_disk(u)
            st.disk_ticket.wait()
            src = st.disk_slot[:u.numel * self.itemsize].view(self.dtype)
        else:
            src = st.home
        if self.prof:
            self.prof.record(KIND_WAIT, u.index, 0, t0)
            t0 = _now()
        storage = st.flat.untyped_storage()
        self.moved["h2d"] += u.numel * self.itemsize
        if self.cuda:
            with torch.cuda.stream(self.h2d):
                storage.resize_(u.numel * self.itemsize)
                st.flat.copy_(src, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(self.h2d)
            st.ready_event = ev
        else:
            storage.resize_(u.numel * self.itemsize)
            st.flat.copy_(src)
            ev = None
        if self.prof:
            self.prof.record(KIND_H2D, u.index, u.numel * self.itemsize, t0)
        if u.plan.params_home == "nvme":
            self.param_slots.release(st.disk_slot, event=ev)
            st.disk_slot = st.disk_ticket = None
        u.state = UnitState.FETCHING if self.cuda else UnitState.READY

    def wait_ready(self, u):
        """Makes the compute stream wait for u's parameters (no host sync on CUDA), after any pending
        optimizer update of the unit has been issued."""
        if self.prof and not u.st.updated.is_set():
            t0 = _now()
            u.st.updated.wait()
            self.prof.record(KIND_WAIT, u.index, 0, t0)
        u.st.updated.wait()
        self.check()
        if u.state == UnitState.RELEASED:
            self.fetch(u)
        if u.state == UnitState.FETCHING:
            torch.cuda.current_stream(self.device).wait_event(u.st.ready_event)
            u.state = UnitState.READY
        if u.st.update_event is not None:
            torch.cuda.current_stream(self.device).wait_event(u.st.update_event)
            u.st.update_event = None

    def release(self, u):
        if u.plan.params_home == "gpu" or u.state == UnitState.RELEASED:
            return
        if self.cuda:
            u.st.flat.record_stream(torch.cuda.current_stream(self.device))
        u.st.flat.untyped_storage().resize_(0)
        u.state = UnitState.RELEASED

    # ---- whole-unit reads and writes (checkpoints, state_dict) ----------------------------------------------
    def read_unit(self, u):
        """CPU copies of (compute-dtype flat, master, exp_avg, exp_avg_sq); the last three None when frozen."""
        st, p = u.st, u.plan
        if p.params_home == "gpu":
            compute = st.flat.detach().cpu().clone()
        elif p.params_home == "cpu":
            compute = st.home.clone()
        else:
            slot = self.param_slots.acquire()
            nb = u.numel * self.itemsize
            self.store.wait(self.store.submit_read(st.home_obj, 0, as_buffer(slot[:nb])))
            compute = slot[:nb].view(self.dtype).clone()
            self.param_slots.release(slot)
        if not u.numel_train:
            return compute, None, None, None
        if p.states_home == "nvme":
            slot, master, m, v = self.read_states(u)
            out = (compute, master.clone(), m.clone(), v.clone())
            self.state_slots.release(slot)
            return out
        return compute, st.master.cpu().clone(), st.exp_avg.cpu().clone(), st.exp_avg_sq.cpu().clone()

    def write_unit(self, u, compute, master=None, exp_avg=None, exp_avg_sq=None):
        st, p = u.st, u.plan
        self.drop_states_ahead()
        compute = compute.to(self.dtype)
        if p.params_home == "gpu":
            st.flat.copy_(compute)
        elif p.params_home == "cpu":
            st.home.copy_(compute)
        else:
            self.write_params(u, compute)
        if u.numel_train and master is not None:
            if p.states_home == "nvme":
                self.write_states(u, master, exp_avg, exp_avg_sq, wait=True)
            else:
                st.master.copy_(master)
                st.exp_avg.copy_(exp_avg)
                st.exp_avg_sq.copy_(exp_avg_sq)

    def close(self):
        # wait_all() raises the first failed request (after all have finished): the store and the arena are
        # released all the same.
        try:
            if self.store is not None:
                try:
                    self.drop_states_ahead()
                    self.store.wait_all()
                finally:
                    self.store.close()
                    self.store = None
        finally:
            if self.arena is not None:
                self.arena.close()
                self.arena = None
