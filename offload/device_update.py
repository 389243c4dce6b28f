"""AdamW on the compute device for units whose optimizer states live in the CPU arena.

The CPU AdamW runs at the host's memory bandwidth (about 4.6 G elements/s on 16 cores), while PCIe has
room to spare when the parameters are resident on the device: a device-resident unit sends only its
gradients out and its updated parameters in, 2 bytes each per element. Streaming a unit's fp32 master and
moments through the device (12 bytes each way per element, full duplex) updates it at about the CPU's rate
again, on the copy engines instead of the cores; the planner gives each resource the share that balances
them (plan.assign_update_sites). Such a unit's gradients never leave the device and its parameters are
written in place by the AdamW kernel, so the host does not take part at all: everything is queued on two
side streams, and the next forward of the unit waits on a CUDA event, not on the host.

Per chunk of CHUNK elements, on the `load` stream: copy master/m/v in, run AdamW, write the compute-dtype
parameters; on the `store` stream: copy master/m/v back out. Two staging buffers alternate, so the copy in
of chunk k+1 overlaps the copy out of chunk k. The alternation runs on across units (self.k), so a unit of
one chunk does not wait for the copy out of the unit before it.

Without CUDA (the compute device is the CPU, as in CI) the same schedule runs synchronously with the
engine's CPU AdamW (exact fp32 parity with torch.optim.AdamW), which is how the bookkeeping is tested.

Note [device-side update order]: the streams run updates in the order they are issued, and each is issued as
its unit's gradients land. The first blocks, which backward reaches last, are so updated last, and the next
forward waits for the whole queue (~0.15 s past the end of backward on the H200 reference step). Two other
orders measured slower there (bench/reference.py, 2026-12-02). Device-side updates on the blocks backward
reaches first left the CPU a late start: 0.732 s against 0.699 s (plan.assign_update_sites). Updates held
on the host and issued lowest unit first, N on the streams at once and a unit's own at its use (IssueQueue,
measured at 2421ed8, since removed) looked faster per timed step only while updates were held past it:
N=1 steps 0.643/0.696/0.710 s but a drained window mean of 0.782 s; N=2 0.609/0.643/0.671 s, rising each
step as held updates piled up, window 0.722 s. Issued as they land: 0.699 s median, 0.705 s window in the
same worker (0.682 s / 0.683 s in run 9d033f3149ad).
"""
import torch

from .adam import unit_adamw_
from .tiers import KIND_D2H, KIND_H2D

CHUNK = 8 << 20   # elements per staged chunk: 96 MiB of fp32 states, large enough for full-rate copies
STAGES = 2


def fill_step(scalar, step, device):
    """The fused AdamW's step count as a device scalar: `scalar` (made on first use) filled with step on the
    current stream. One scalar serves every unit of a stream: each fill runs after the previous kernel
    read it. A fresh tensor per unit would be an allocation per unit per step; torch.tensor(step,
    device=...) a blocking copy from pageable memory."""
    if scalar is None:
        scalar = torch.zeros((), dtype=torch.float32, device=device)
    return scalar.fill_(float(step))


def fused_adamw(master, grad, exp_avg, exp_avg_sq, step_t, hyper, found_inf=None):
    """torch's fused AdamW over one fp32 slice in place (all four one dtype), step count `step_t` on the
    device (fill_step); found_inf: a device flag that, set, leaves everything unchanged."""
    lr, betas, eps, wd = hyper
    torch._fused_adamw_([master], [grad], [exp_avg], [exp_avg_sq], [], [step_t], lr=lr, beta1=betas[0],
                        beta2=betas[1], weight_decay=wd, eps=eps, amsgrad=False, maximize=False,
                        found_inf=found_inf)


def chunk_elems(largest_unit):
    """Elements per staged chunk for units of up to largest_unit trainable elements."""
    return max(1, min(CHUNK, largest_unit))


def staging_bytes(chunk):
    """Device bytes the staging buffers take: master, m, v and an fp32 copy of the gradients per stage."""
    return STAGES * chunk * 16


class DeviceUpdater:
    def __init__(self, device, count_moved, chunk=CHUNK, resident_chunk=CHUNK):
        self.device = device
        self.chunk = chunk
        self.resident_chunk = resident_chunk   # elements of update_resident's scratch
        self.cuda = device.type == "cuda"
        self.count_moved = count_moved   # (direction, bytes) -> None: the tiers' transfer counters
        self.stages = None
        self.k = 0    # chunks staged so far: chunk k goes through stage k % STAGES
        self.step_t = None   # the fused kernel's step count, on the device
        self.resident_step_t = None   # update_resident's, on the compute stream
        self.scratch = None  # update_resident's fp32 gradient chunk
        if self.cuda:
            self.load = torch.cuda.Stream(device)
            self.store = torch.cuda.Stream(device)
            self.freed = [None] * STAGES   # event: the copy out of what the stage held has finished

    def _stage(self, k):
        if self.stages is None:
            self.stages = [torch.empty(4, self.chunk, dtype=torch.float32, device=self.device) for _ in range(STAGES)]
        return self.stages[k % STAGES]

    def update_resident(self, u, grad, segments, hyper, found_inf=None):
        """AdamW of a unit whose states live on the device, queued on the current (compute) stream as its
        gradients land (Note [device-tier update at landing] in engine.py). The fused kernel takes one dtype
        for all four, so the compute-dtype gradients go through one fp32 scratch chunk by chunk: a unit
        keeps no fp32 gradient buffer of its own. Not on the load stream: it would queue behind the link's
        copies of the arena units' states, and it takes ~1 ms of the device for a 113M-element block. CUDA
        only: on a CPU device update() serves both (it runs synchronously there)."""
        st = u.st
        if self.scratch is None:
            self.scratch = torch.empty(self.resident_chunk, dtype=torch.float32, device=self.device)
        for off, n, step in segments:
            # its own step scalar: the load stream's may still be read by a kernel queued there
            step_t = self.resident_step_t = fill_step(self.resident_step_t, step, self.device)
            for c0 in range(off, off + n, self.resident_chunk):
                sl = slice(c0, c0 + min(self.resident_chunk, off + n - c0))
                g = self.scratch[:sl.stop - c0]
                g.copy_(grad[sl])
                fused_adamw(st.master[sl], g, st.exp_avg[sl], st.exp_avg_sq[sl], step_t, hyper, found_inf)
                st.flat[sl].copy_(st.master[sl])
        return None

    def update(self, u, grad, segments, hyper, grad_ready=None, found_inf=None, prof=None):
        """Queues AdamW over u's segments [(offset, numel, step)] with its gradients `grad` (flat, on the
        device). grad_ready: event after which grad is complete. found_inf: a device flag; when set, the
        fused kernel leaves everything unchanged. prof: the run's Profiler, which gets each chunk's copies
        of the states in and out as h2d and d2h spans (on the reference workload they are most of what
        crosses PCIe). Returns the event the unit's next use must wait for (None on the CPU, where it is
        done on return)."""
        st = u.st
        lr, betas, eps, wd = hyper
        if not self.cuda:
            for off, n, step in segments:
                sl = slice(off, off + n)
                unit_adamw_(st.master[sl], grad[sl], st.exp_avg[sl], st.exp_avg_sq[sl], lr=lr, betas=betas,
                            eps=eps, weight_decay=wd, step=step, out=st.flat[sl])
            return None
        load, store = self.load, self.store
        if grad_ready is not None:
            load.wait_event(grad_ready)
        if st.states_event is not None:   # the previous step's copy out of these states
            load.wait_event(st.states_event)
        k = self.k
        host = (st.master, st.exp_avg, st.exp_avg_sq)
        for off, n, step in segments:
            with torch.cuda.stream(load):
                step_t = self.step_t = fill_step(self.step_t, step, self.device)
            for c0 in range(off, off + n, self.chunk):
                c = min(self.chunk, off + n - c0)
                buf = self._stage(k)
                with torch.cuda.stream(load):
                    if self.freed[k % STAGES] is not None:
                        load.wait_event(self.freed[k % STAGES])
                    t_in = prof.begin_work(KIND_H2D, u.index, load) if prof else None
                    for row, src in enumerate(host):
                        buf[row, :c].copy_(src[c0:c0 + c], non_blocking=True)
                    if t_in is not None:
                        prof.end_work(t_in, KIND_H2D, u.index, 12 * c, load)
                    master, m, v, g = buf[0, :c], buf[1, :c], buf[2, :c], buf[3, :c]
                    g.copy_(grad[c0:c0 + c])   # the fused kernel takes one dtype for all four
                    fused_adamw(master, g, m, v, step_t, hyper, found_inf)
                    st.flat[c0:c0 + c].copy_(master)
                    computed = torch.cuda.Event()
                    computed.record(load)
                with torch.cuda.stream(store):
                    store.wait_event(computed)
                    t_out = prof.begin_work(KIND_D2H, u.index, store) if prof else None
                    for row, dst in enumerate(host):
                        dst[c0:c0 + c].copy_(buf[row, :c], non_blocking=True)
                    if t_out is not None:
                        prof.end_work(t_out, KIND_D2H, u.index, 12 * c, store)
                    freed = torch.cuda.Event()
                    freed.record(store)
                self.freed[k % STAGES] = freed
                k += 1
        self.count_moved("h2d", 12 * sum(n for _, n, _ in segments))
        self.count_moved("d2h", 12 * sum(n for _, n, _ in segments))
        grad.record_stream(load)
        if found_inf is not None:
            found_inf.record_stream(load)
        done = torch.cuda.Event()
        done.record(load)
        if k != self.k:   # the store stream runs in order: the last chunk's copy out is the unit's last
            st.states_event = self.freed[(k - 1) % STAGES]
        self.k = k
        return done
