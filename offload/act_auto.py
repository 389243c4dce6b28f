"""activations="auto" after the first step: per block, keep / swap / token-wise split / recompute, from what
that step measured (Note [auto activations]).

Note [auto activations]: the first step keeps blocks while the projected activation memory fits the device
budget and recomputes the rest (stream.Streamer._policy), and it times every block's forward on the device
(CUDA events) and measures each block's activation bytes (the growth of allocated memory across a kept
block). After it:
1. keep: the memory left under the budget at that step's peak (less what optimizer states moving onto the
   device now claim, Note [device states after the first step]) lets the last recomputed blocks keep their
   activations instead (they are the first ones backward needs); one block's worth stays free for the
   swap-in prefetch when anything is swapped, and with less than that left nothing is (a swapped block
   back before its backward sits beside the one running; without room, the head's float logits gradient
   met that copy at the cap: out of memory at lm_head on the long-context workload).
2. swap: of the blocks still recomputed, some are swapped whole while the copies fit the link beside the
   model state it already carries, spread evenly over the forward from its first block: a block's copy
   takes longer than its compute wherever swapping pays at all (a 32k-token block: 58 ms of copy, 16 ms of
   forward), so back-to-back swapped blocks pile their copies up on the device in forward and stall each
   other's swap-in in backward, where the prefetch of one swapped block starts with the backward of the
   next; spread out, each copy runs under the compute of the recomputed blocks between them. Copies go
   out during forward and come back during backward, each direction within SWAP_HIDE_SHARE of the step's
   compute less the state traffic. The forward's compute is the median block's, measured by CUDA events,
   times the blocks; the rate is the machine profile's device->host one (or a pinned copy measured now,
   inside the memory the budget leaves: nothing is swapped when it leaves too little to measure). The
   host copies must fit the CPU memory left beside the arena. Hidden traffic costs nothing; a recompute
   costs a forward of the block. Where the link is already the binding resource (the reference workload
   streams its optimizer states through it), nothing is swapped.
3. split: the traffic still hidden after that gives the next block a token-wise split with the fraction
   it covers (at least SPLIT_MIN): its leaves after attention then recompute fewer rows.
The rest stay recomputed. The choice is written into the plan (str(engine.plan)).
"""
import torch

from .machine import device_to_host_rate
from .plan import state_traffic_bytes

AUTO_SAFETY = 0.05      # of the device budget, never planned into when converting blocks back to "keep"
SWAP_HIDE_SHARE = 0.9   # of the forward's compute time that activation copies to the host may take
SPLIT_MIN = 0.1         # smaller fractions save too little to pay for their calibration step
HOST_SHARE = 0.9        # of the CPU memory beside the arena that activation copies may take
BACKWARD_PLUS_FORWARD = 3.0   # a step's compute in forwards (backward costs about two)


def backward_hides_s(fwd_s):
    """How long work beside backward may run and still hide under it, for a forward of fwd_s seconds."""
    return SWAP_HIDE_SHARE * (BACKWARD_PLUS_FORWARD - 1) * fwd_s


def start_timer(device):
    ev = torch.cuda.Event(enable_timing=True)
    ev.record(torch.cuda.current_stream(device))
    return [ev, None]


def stop_timer(timer, device):
    ev = torch.cuda.Event(enable_timing=True)
    ev.record(torch.cuda.current_stream(device))
    timer[1] = ev


def forward_seconds(streamer):
    """The blocks' forward compute of one step, from the first step's CUDA events: the median block times the
    number of blocks, since the first blocks of a process's first step also pay one-off costs (kernel
    selection, allocator growth) that would make hiding look several times cheaper than it is. None when
    nothing was timed."""
    times = []
    for u in streamer.units:
        t = u.extra.get("fwd_timer")
        if t is not None and t[1] is not None:
            times.append(t)
    if not times:
        return None
    torch.cuda.synchronize(streamer.device)
    each = sorted(a.elapsed_time(b) / 1e3 for a, b in times)
    return each[len(each) // 2] * len(each)


def host_room(plan):
    import psutil
    cpu = plan.budgets.get("cpu")
    free = cpu - plan.buffers.get("cpu_arena", 0) if cpu is not None else psutil.virtual_memory().available
    return int(max(0, free) * HOST_SHARE)


def spread(n, k):
    """k of the positions 0..n-1, evenly apart, from 0 (Note [auto activations], 2)."""
    return [j * n // k for j in range(k)]


def choose(recomputed, act_bytes, fwd_s, spare, d2h_rate, room, busy_s=0.0):
    """{block index: policy} for the blocks the first step recomputed (forward order), following Note
    [auto activations]. act_bytes: one block's activations; fwd_s: the forward's compute of all blocks;
    spare: device bytes left under the budget at the first step's peak; room: host bytes for copies;
    busy_s: seconds per step each direction of the link already spends on model state (params, gradients,
    optimizer states), which the copies must fit beside."""
    out = {i: "recompute" for i in recomputed}
    if not recomputed or act_bytes <= 0:
        return out
    # Copies out run during forward; copies back during backward (about twice the forward), where the state
    # traffic also runs: both directions carry the copies and the state traffic within the step's compute.
    link_s = max(0.0, min(SWAP_HIDE_SHARE * fwd_s, SWAP_HIDE_SHARE * BACKWARD_PLUS_FORWARD * fwd_s - busy_s))
    hidden = min(link_s * d2h_rate, room) / act_bytes   # blocks' worth of hidden traffic

    def assign(n_keep):
        rest = recomputed[:len(recomputed) - n_keep]
        n_swap = min(len(rest), int(hidden))
        a = round(min(hidden - n_swap, 1 - SPLIT_MIN), 2)
        has_split = n_swap < len(rest) and a >= SPLIT_MIN
        slots = spread(len(rest), n_swap + has_split)    # the split block takes the last slot
        split = rest[slots[-1]] if has_split else None
        return [rest[i] for i in slots[:n_swap]], split, recomputed[len(recomputed) - n_keep:], a

    n_keep = min(len(recomputed), max(0, spare // act_bytes))
    swap, split, keep, a = assign(n_keep)
    if (swap or split is not None) and (n_keep + 1) * act_bytes > spare:
        # One block's worth stays free for the swap-in prefetch: backward holds a swapped block's copy beside
        # the block it is running, where recompute holds one at a time.
        if n_keep:
            swap, split, keep, a = assign(n_keep - 1)
        else:
            swap, split = [], None
    out.update({i: "swap" for i in swap})
    out.update({i: "keep" for i in keep})
    if split is not None:
        out[split] = a
    return out


def device_room(budget, device):
    """Device bytes the first step left unused under budget (less the AUTO_SAFETY margin), for states moving
    onto the device and blocks keeping their activations. Measured from the allocator's reserved peak, not
    the allocated one: the cap bounds reserved segments, and a large allocation (a long sequence's float
    logits) fails under a cap whose free bytes are split across segments."""
    return int(budget * (1 - AUTO_SAFETY)) - torch.cuda.max_memory_reserved(device)


def adjust(streamer, fwd_s, claimed=0):
    """Applies choose() to a streamer after its first step (stream.Streamer.adjust_after_first_step).
    fwd_s: forward_seconds() of that step; claimed: device bytes promised to optimizer states moving onto
    the device now (engine._plan_promotion)."""
    s = streamer
    if s.act_adjusted or not s.cuda:
        return
    s.act_adjusted = True     # also stops the timing of block forwards
    for u in s.units:
        u.extra.pop("fwd_timer", None)
    budget = s.plan.budgets.get("gpu")
    if budget is None or not s.act_peak or fwd_s is None:
        return
    spare = device_room(budget, s.device) - claimed
    recomputed = sorted(i for i, p in s.act_decided.items() if p == "recompute")
    d2h = device_to_host_rate(s.device, max(0, spare)) or 0.0     # unknown: nothing is swapped
    busy_s = state_traffic_bytes(s.units, s.plan.units, s.plan.itemsize)["pcie"] / 2 / d2h if d2h else 0.0
    # Host copies come from torch's pinned caching allocator, which rounds each block up to a power of two:
    # up to twice the bytes.
    room = host_room(s.plan) // 2
    chosen = choose(recomputed, s.act_peak, fwd_s, max(0, spare), d2h, room, busy_s)
    s.act_decided.update(chosen)
    for i, p in s.act_decided.items():
        s.plan.units[i].activations_chosen = p
    counts = {}
    for p in s.act_decided.values():
        counts[str(p)] = counts.get(str(p), 0) + 1
    s.plan.notes.append(
        "activations auto (after step 1): " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        + f"; measured per block {s.act_peak / 2**20:.0f} MiB of activations, forward compute {fwd_s:.3f} s, "
          f"device->host {d2h / 1e9:.1f} GB/s of which model state takes {busy_s:.3f} s a step, host room "
          f"{room / 2**30:.1f} GiB")
