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
With several ranks (shard.py) everything but `flat` holds only this rank's slice, u.shard: home is
u.shard.local elements, master/moments/grad/acc/out u.shard.train; `flat` is whole and filled by an
all-gather. With one rank the slice is the whole unit.

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
from .profiler import WAIT_DISK, WAIT_H2D, WAIT_OPTIM
from .shard import spec_for
from .store import as_buffer, open_store


# Note [slot reserve]: slots a prefetch leaves to demand paths. One is enough: the demand holders (a fetch on
# the caller's thread, the optimizer thread's output slot, an update reading its own unit's states) each give
# their slot back without waiting on anything the other holds, so they can share it.
PARAM_SLOT_RESERVE = 1
STATE_SLOT_RESERVE = 1
KIND_H2D, KIND_D2H, KIND_OPTIM = _native.trace_kind.H2D, _native.trace_kind.D2H, _native.trace_kind.OPTIM
KIND_DISK_READ, KIND_DISK_WRITE = _native.trace_kind.DISK_READ, _native.trace_kind.DISK_WRITE


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
    states_event: object = None         # device-side AdamW: copy of the states back to the arena done
    stale: bool = False                 # resident flat holds only this rank's updated slice: gather before use
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
    event that still uses it; reuse waits for that (back-pressure, never an error).

    Note [slot reserve]: a prefetch that holds a slot keeps it until the unit is fetched, which only the
    thread that prefetched does; if prefetches could take every slot, a fetch on demand (or the optimizer's
    output slot) on another path would wait forever. Prefetches therefore take a slot only with
    try_acquire(reserve), which leaves `reserve` slots to demand paths and returns None instead of waiting:
    the prefetch is skipped and the unit is read when it is needed."""

    def __init__(self, arena, count, nbytes, store):
        self.store = store
        self.count = count if count and nbytes else 0
        self.free = deque(arena.tensor(nbytes, torch.uint8) for _ in range(self.count))
        self.busy = deque()   # (slot, ticket or None, event or None)
        self.cond = threading.Condition()

    def acquire(self):
        """A slot, waiting for one whose last I/O is still in flight, or for a holder to give one back."""
        with self.cond:
            if not self.count:
                raise RuntimeError("SlotRing.acquire: this ring has no slots (nothing of this kind is on NVMe)")
            self.cond.wait_for(lambda: self.free or self.busy)
            taken = self._take_locked()
        return self._settle(*taken)

    def try_acquire(self, reserve):
        """A slot if more than `reserve` are free or only waiting on their last I/O, else None (never
        waits for a holder: Note [slot reserve])."""
        with self.cond:
            if len(self.free) + len(self.busy) <= reserve:
                return None
            taken = self._take_locked()
        return self._settle(*taken)

    def _take_locked(self):
        return (self.free.popleft(), None, None) if self.free else self.busy.popleft()

    @staticmethod
    def _settle(slot, ticket, event):
        # The slot is ours already: its last I/O or copy is waited for outside the lock.
        if ticket is not None:
            ticket.wait()
        if event is not None:
            event.synchronize()
        return slot

    def release(self, slot, ticket=None, event=None):
        with self.cond:
            if ticket is None and event is None:
                self.free.append(slot)
            else:
                self.busy.append((slot, ticket, event))
            self.cond.notify()


class Tiers:
    def __init__(self, units, plan, *, device, dtype, nvme, trace=None, comm=None):
        self.units, self.plan, self.device, self.dtype = units, plan, device, dtype
        self.comm = comm   # shard.Comm with several ranks, else None
        for u in units:
            u.shard = spec_for(u, comm)
        self.itemsize = torch.empty((), dtype=dtype).element_size()
        self.cuda = device.type == "cuda"
        self.h2d = torch.cuda.Stream(device) if self.cuda else None
        self.d2h = torch.cuda.Stream(device) if self.cuda else None
        arena_bytes = plan.arena_bytes
        self.arena = HostArena(max(arena_bytes, 4096), pin=self.cuda) if arena_bytes else None
        uses_disk = any(p.params_home == "nvme" or p.states_home == "nvme" for p in plan.units)
        self.prof = trace   # a profiler.Profiler or None
        self.store = open_store(nvme, queue_depth=plan.queue_depth, trace=trace.ring if trace else None) if uses_disk else None
        max_state = max((u.shard.train * 12 for u, p in zip(units, plan.units) if p.states_home == "nvme"), default=0)
        max_param = max((u.shard.local * self.itemsize for u, p in zip(units, plan.units) if p.params_home == "nvme"),
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
        self._moved_lock = threading.Lock()   # counted from the caller's and the optimizer's threads
        for u, p in zip(units, plan.units):
            u.st = UnitStorage()
            u.plan = p

    def count(self, direction, nbytes):
        """Adds to the bytes moved over one link (a read-modify-write: two threads count)."""
        with self._moved_lock:
            self.moved[direction] += nbytes

    # ---- setup ---------------------------------------------------------------------------------------
    def allocate(self, grad_accum, device_grads=True):
        """device_grads: device-tier units keep an fp32 gradient buffer for an update at step() (False: the
        engine updates them as their gradients land, Note [device-tier update at landing] in engine.py)."""
        self.grad_accum = grad_accum
        self.device_grads = device_grads
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
            st.home = self._host(u.shard.local, self.dtype)
        elif p.params_home == "nvme":
            st.home_obj = self.store.create(u.shard.local * self.itemsize)
        n = u.shard.train
        if n:
            st.steps = [0] * sum(1 for s in u.slots if s.trainable)
            st.has_grad = [False] * len(st.steps)
            if p.states_home == "gpu":
                st.master, st.exp_avg, st.exp_avg_sq = (torch.zeros(n, dtype=torch.float32, device=dev)
                                                        for _ in range(3))
                if self.device_grads:
                    st.dgrad = torch.zeros(n, dtype=torch.float32, device=dev)
            else:
                if p.states_home == "cpu":
                    st.master, st.exp_avg, st.exp_avg_sq = (self._host(n, torch.float32) for _ in range(3))
                else:
                    st.states_obj = self.store.create(n * 12)
                if p.update_on == "host":   # device-side AdamW keeps gradients and output on the device
                    st.grad = self._host(n, self.dtype)
                    if self.grad_accum > 1:
                        st.acc = self._host(n, torch.float32)
                    if p.params_home == "gpu":
                        # The AdamW output (copied to the device) is written over the gradients it was
                        # computed from, element by element after reading them: the buffer is free by then,
                        # and a second one would cost the arena itemsize bytes an element (a quarter of a
                        # 10B model's host memory beside its states).
                        st.out = st.grad

    def load_initial(self, u, values):
        """values: fp32 CPU flat of u.numel holding the unit's parameters (padding zero), alike on every rank;
        moments start at 0."""
        local = u.shard.take(values)
        zeros = torch.zeros(u.shard.train, dtype=torch.float32)
        self.write_unit(u, local, local[:u.shard.train], zeros, zeros)
        if u.plan.params_home == "gpu" and self.comm is not None:
            u.st.flat.copy_(values)     # every rank holds the whole: no gather needed
            u.st.stale = False

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
    def submit_disk(self, write, obj, buf, u):
        """A store request for unit u's object, tagged with u so that the trace names the unit. While a
        torch profiler runs, issuing it is an offload::disk_read/disk_write range; the store's ring times
        the transfer itself."""
        submit = self.store.submit_write if write else self.store.submit_read
        if self.prof is None:
            return submit(obj, 0, buf, tag=u.index)
        with self.prof.issuing(KIND_DISK_WRITE if write else KIND_DISK_READ, u.index):
            return submit(obj, 0, buf, tag=u.index)

    def write_params(self, u, compute_flat, length=None):
        """Synchronous write of compute-dtype params (setup, checkpoint load)."""
        slot = self.param_slots.acquire()
        nb = (length if length is not None else u.shard.local) * self.itemsize
        slot[:nb].copy_(compute_flat[:nb // self.itemsize].view(torch.uint8))
        self.store.wait(self.submit_disk(True, u.st.home_obj, as_buffer(slot[:nb]), u))
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
        n = u.shard.train
        f = slot[:n * 12].view(torch.float32)
        return slot, f[:n], f[n:2 * n], f[2 * n:]

    def _read_states_into(self, u, slot):
        st = u.st
        if st.states_write is not None:   # the previous update's write-behind must land first
            st.states_write.wait()
            st.states_write = None
        n = u.shard.train
        pending = Pending(self.store, self.submit_disk(False, st.states_obj, as_buffer(slot[:n * 12]), u))
        self.count("disk_read", n * 12)
        return slot, pending

    def read_states_ahead(self, u):
        """Note [state read-ahead]: while the backward pass computes the next unit's gradients, its states
        are read from disk into the second staging slot, so its update starts on data already in memory.
        At most one read-ahead is outstanding; one that is not used (the step went another way) is dropped
        before the slot is needed, and before any other write of that unit's states."""
        if self.states_ahead is not None or u.plan.states_home != "nvme":
            return
        slot = self.state_slots.try_acquire(STATE_SLOT_RESERVE)
        if slot is None:
            return
        slot, pending = self._read_states_into(u, slot)
        self.states_ahead = (u, slot, pending)

    def drop_states_ahead(self):
        ahead, self.states_ahead = self.states_ahead, None
        if ahead is not None:
            ahead[2].wait()
            self.state_slots.release(ahead[1])

    def write_states(self, u, master, exp_avg, exp_avg_sq, wait=False, slot=None):
        st, n = u.st, u.shard.train
        if slot is None:
            slot = self.state_slots.acquire()
            f = slot[:n * 12].view(torch.float32)
            f[:n].copy_(master)
            f[n:2 * n].copy_(exp_avg)
            f[2 * n:].copy_(exp_avg_sq)
        ticket = Pending(self.store, self.submit_disk(True, st.states_obj, as_buffer(slot[:n * 12]), u))
        self.count("disk_write", n * 12)
        if wait:
            ticket.wait()
            self.state_slots.release(slot)
        else:
            st.states_write = ticket
            self.state_slots.release(slot, ticket=ticket)

    # ---- compute-side residency --------------------------------------------------------------------------
    def prefetch_disk(self, u, ahead=False):
        """Starts the NVMe read of u's params into a staging slot. ahead=True (a prefetch, not a fetch that
        needs the data now): skipped when taking a slot would eat into the reserve (Note [slot reserve])."""
        st = u.st
        if u.plan.params_home != "nvme" or st.disk_ticket is not None or u.state != UnitState.RELEASED:
            return
        st.updated.wait()
        slot = self.param_slots.try_acquire(PARAM_SLOT_RESERVE) if ahead else self.param_slots.acquire()
        if slot is None:
            return
        st.disk_slot = slot
        nb = u.shard.local * self.itemsize
        st.disk_ticket = Pending(self.store, self.submit_disk(False, st.home_obj, as_buffer(slot[:nb]), u))
        self.count("disk_read", nb)

    def fetch(self, u):
        """Starts making u.flat valid on the compute device (asynchronous on CUDA)."""
        if u.state != UnitState.RELEASED:
            return
        st, prof, nbytes = u.st, self.prof, u.numel * self.itemsize
        self._wait_update(u)   # the optimizer must have written this unit's new values first
        if u.plan.params_home == "nvme":
            if st.disk_ticket is None:
                self.prefetch_disk(u)
            t0 = prof.begin(WAIT_DISK, u.index) if prof else None
            st.disk_ticket.wait()
            if t0 is not None:
                prof.record(WAIT_DISK, u.index, 0, t0)
            src = st.disk_slot[:u.shard.local * self.itemsize].view(self.dtype)
        else:
            src = st.home
        storage = st.flat.untyped_storage()
        nb = u.shard.local * self.itemsize
        self.count("h2d", nb)
        if self.cuda:
            with torch.cuda.stream(self.h2d):
                storage.resize_(nbytes)
                t0 = prof.begin_work(KIND_H2D, u.index, self.h2d) if prof else None
                if self.comm is None:
                    st.flat.copy_(src, non_blocking=True)
                else:   # NCCL's stream waits for this copy; the h2d stream waits for the gather
                    self.comm.gather_flat(u, src.to(self.device, non_blocking=True), st.flat)
                if t0 is not None:
                    prof.end_work(t0, KIND_H2D, u.index, nb, self.h2d)
                ev = torch.cuda.Event()
                ev.record(self.h2d)
            st.ready_event = ev
        else:
            storage.resize_(nbytes)
            t0 = prof.begin_work(KIND_H2D, u.index) if prof else None
            if self.comm is None:
                st.flat.copy_(src)
            else:
                self.comm.gather_flat(u, src, st.flat)
            if t0 is not None:
                prof.end_work(t0, KIND_H2D, u.index, nb)
            ev = None
        if u.plan.params_home == "nvme":
            self.param_slots.release(st.disk_slot, event=ev)
            st.disk_slot = st.disk_ticket = None
        u.state = UnitState.FETCHING if self.cuda else UnitState.READY

    def wait_ready(self, u):
        """Makes the compute stream wait for u's parameters (no host sync on CUDA), after any pending
        optimizer update of the unit has been issued."""
        self._wait_update(u)
        self.check()
        if u.state == UnitState.RELEASED:
            self.fetch(u)
        if u.state == UnitState.FETCHING:
            # Traced on the compute stream: the span is how long compute sat blocked on the copy.
            t0 = self.prof.begin_work(WAIT_H2D, u.index) if self.prof else None
            torch.cuda.current_stream(self.device).wait_event(u.st.ready_event)
            if t0 is not None:
                self.prof.end_work(t0, WAIT_H2D, u.index)
            u.state = UnitState.READY
        if u.st.update_event is not None:
            torch.cuda.current_stream(self.device).wait_event(u.st.update_event)
            u.st.update_event = None
        if u.st.stale:
            self.regather(u)

    def regather(self, u):
        """A resident unit's flat after this rank updated its own slice: the other ranks' slices are gathered
        (every rank reaches this at the same point of the step, so the collectives pair up)."""
        u.st.stale = False
        self.comm.gather_flat(u, u.shard.take(u.st.flat), u.st.flat)

    def _wait_update(self, u):
        """Waits for a pending optimizer update of u; traced only when there is one to wait for."""
        if self.prof and not u.st.updated.is_set():
            t0 = self.prof.begin(WAIT_OPTIM, u.index)
            u.st.updated.wait()
            self.prof.record(WAIT_OPTIM, u.index, 0, t0)
        u.st.updated.wait()

    def release(self, u):
        if u.plan.params_home == "gpu":
            return
        if u.state == UnitState.RELEASED:
            self._drop_disk_prefetch(u)
            return
        if self.cuda:
            u.st.flat.record_stream(torch.cuda.current_stream(self.device))
        u.st.flat.untyped_storage().resize_(0)
        u.state = UnitState.RELEASED

    def _drop_disk_prefetch(self, u):
        """A disk read prefetched in vain (the step went another way, Note [prefetch order]) gives its slot
        back at the end of the phase instead of holding it until the unit is next fetched."""
        st = u.st
        if st.disk_ticket is not None:
            st.disk_ticket.wait()
            self.param_slots.release(st.disk_slot)
            st.disk_slot = st.disk_ticket = None

    # ---- whole-unit reads and writes (checkpoints, state_dict) ----------------------------------------------
    def read_unit(self, u):
        """CPU copies of this rank's (compute-dtype flat, master, exp_avg, exp_avg_sq) slices; the last three
        None when frozen."""
        st, p = u.st, u.plan
        if p.params_home == "gpu":
            compute = u.shard.take(st.flat.detach()).cpu().clone()
        elif p.params_home == "cpu":
            compute = st.home.clone()
        else:
            slot = self.param_slots.acquire()
            nb = u.shard.local * self.itemsize
            self.store.wait(self.submit_disk(False, st.home_obj, as_buffer(slot[:nb]), u))
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
        """Writes this rank's slices; a resident flat is then stale until regather() (several ranks)."""
        st, p = u.st, u.plan
        self.drop_states_ahead()
        compute = compute.to(self.dtype)
        if p.params_home == "gpu":
            u.shard.put(st.flat, compute)
            st.stale = self.comm is not None
        elif p.params_home == "cpu":
            st.home.copy_(compute)
        else:
            self.write_params(u, compute)
        if u.shard.train and master is not None:
            if p.states_home == "nvme":
                self.write_states(u, master, exp_avg, exp_avg_sq, wait=True)
            else:
                st.master.copy_(master)
                st.exp_avg.copy_(exp_avg)
                st.exp_avg_sq.copy_(exp_avg_sq)

    def close(self):
        # wait_all() raises the first failed request (after all have finished): the store and the arena are
        # released all the same. Copies queued on the side streams may still read or write the arena (a
        # prefetch from a home, device-side AdamW's copy of the states back, Note [device-side AdamW] in
        # plan.py): unpinning and unmapping it under them would leave the DMA on freed pages, so the device is
        # drained first.
        try:
            if self.cuda:
                torch.cuda.synchronize(self.device)
        finally:
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
