"""Placement of every unit's state across the tiers, under the budgets, before any work starts.

Per unit the plan places the compute-dtype parameters ("params") and the fp32 master weights with the two
AdamW moments ("states"). Principles (DESIGN.md): the compute device first, then the CPU arena, then NVMe;
spill only what does not fit; refuse impossible budgets up front, saying by how much they fall short.

Byte accounting (all of it is what tiers.py allocates, so the arena budget is exact):
- compute device: resident params (numel * itemsize), device states (16 B per trainable element: master,
  m, v and an fp32 gradient), and for streamed units a working set of (depth + 2) flat buffers plus two
  gradient buffers of the largest unit.
- CPU arena: a gradient buffer per unit whose optimizer runs on the CPU (compute dtype; plus an fp32
  accumulator when grad_accum > 1; the CPU AdamW's output for device-resident params is written over it),
  params homes, states, and NVMe staging slots when anything lives on disk.
With `shards` ranks (shard.py) each rank plans its own budgets: what a rank holds of a unit off the compute
device (params home, master/m/v, host gradients, staging) and its device states are 1/shards of the unit; the
compute-side flat buffers (resident params, the streaming working set) are whole on every rank.
"""
import math
from dataclasses import dataclass, field, replace

from .errors import BudgetError, ConfigError
from .overrides import NONE as NO_OVERRIDES
from .sizes import fmt_bytes, pinned_bytes

ARENA_ALIGN = 4096
STATE_BYTES = 12       # fp32 master + exp_avg + exp_avg_sq per trainable element
DEVICE_GRAD_BYTES = 4  # fp32 gradient the device-side AdamW consumes


def _a(n):
    return -(-int(n) // ARENA_ALIGN) * ARENA_ALIGN


@dataclass
class UnitPlan:
    name: str
    numel: int
    numel_train: int
    params_home: str   # "gpu" | "cpu" | "nvme"
    states_home: str   # "gpu" | "cpu" | "nvme" | "-" (frozen unit: no states)
    activations: str = "keep"
    update_on: str = "host"   # where AdamW runs for arena states: "host" (CPU) or "device" (streamed through it)
    activations_chosen: object = None   # what "auto" picked for the unit after the first step
    shards: int = 1    # ranks the unit is split over: this rank holds numel // shards of it off the device
    promote: bool = False   # states planned for the device, held in the arena until step 1 has measured the
                            # activations (Note [device states after the first step])

    @property
    def states_target(self):
        """Where the states are placed once the first step has run (states_home is where they are now)."""
        return "gpu" if self.promote else self.states_home


@dataclass
class Plan:
    """Where everything lives. `bytes` is model state per tier (params + master/m/v); `buffers` the
    working buffers beside it; str() is a readable table."""
    units: list
    bytes: dict
    buffers: dict
    budgets: dict
    prefetch_depth: int = 2
    disk_prefetch_depth: int = 4
    state_slots: int = 2
    param_slots: int = 0
    device: str = "cpu"
    predicted_step_s: float = None
    bottleneck: str = None
    notes: list = field(default_factory=list)
    resource_s: dict = field(default_factory=dict)
    itemsize: int = 2
    compute_included: bool = False
    act_reserve: int = 0      # device bytes kept for activations (engine_placement)
    batch_overrides: dict = None     # what plan_for_batch added to engine()'s overrides for the batch to fit
    queue_depth: int = 32     # the disk store's requests in flight

    def predict(self, tokens_per_step, rates, shape, act=None, micro_batches=1):
        """Prices a step with compute (Note [step-time model]); updates predicted_step_s, bottleneck and
        resource_s to cover it, and returns the StepPrediction."""
        p = predict_step(self, shape, tokens_per_step, rates, act, micro_batches)
        self.predicted_step_s, self.bottleneck, self.resource_s = p.step_s, p.bottleneck, dict(p.resource_s)
        self.compute_included = True
        return p

    @property
    def arena_bytes(self):
        return self.buffers["cpu_arena"]

    def __str__(self):
        ranks = self.units[0].shards if self.units else 1
        lines = [f"offload plan on {self.device}: {len(self.units)} units"
                 + (f", sharded over {ranks} ranks (model state and budgets per rank)" if ranks > 1 else ""),
                 f"{'tier':<6}{'model state':>14}{'budget':>14}"]
        for tier in ("gpu", "cpu", "nvme"):
            b = self.budgets.get(tier)
            lines.append(f"{tier:<6}{fmt_bytes(self.bytes[tier]):>14}{(fmt_bytes(b) if b is not None else '-'):>14}")
        lines.append("buffers: " + ", ".join(f"{k}={fmt_bytes(v)}" for k, v in self.buffers.items()))
        lines.append(f"prefetch depth {self.prefetch_depth} (host->device), {self.disk_prefetch_depth} (disk->host)")
        if self.predicted_step_s is not None:
            what = "step" if self.compute_included else "state traffic per step (compute excluded)"
            lines.append(f"predicted {what}: {self.predicted_step_s:.3f} s, "
                         f"bound by {self.bottleneck} (" + ", ".join(f"{k} {v:.3f} s" for k, v in self.resource_s.items()) + ")")
        lines.append(f"{'unit':<28}{'elements':>14}  params  states  adamw   activations")
        shown = self.units if len(self.units) <= 12 else self.units[:5] + [None] + self.units[-5:]
        for u in shown:
            if u is None:
                lines.append(f"{'...':<28}")
                continue
            where = "-" if u.states_home == "-" else ("gpu" if u.states_home == "gpu" or u.update_on == "device"
                                                       else "cpu")
            states = "gpu*" if u.promote else u.states_home
            where = "gpu*" if u.promote else where
            act = u.activations if u.activations_chosen is None else f"{u.activations}: {u.activations_chosen}"
            lines.append(f"{u.name[:27]:<28}{u.numel:>14,}  {u.params_home:<6}  {states:<6}  {where:<6}  {act}")
        lines += self.notes
        return "\n".join(lines)


STREAM_DEPTH = 2   # host->device prefetch distance; disk reads run STREAM_DEPTH + 2 ahead
STATE_SLOTS = 2    # NVMe state staging: one unit being updated while the previous one is written back


def stream_working_set(units, itemsize, depth=STREAM_DEPTH):
    """Device bytes a streamed configuration needs: (depth + 2) flat buffers (the unit computing, `depth`
    prefetched, one being released) and two gradient buffers of the largest unit."""
    max_unit = max(u.numel for u in units) * itemsize
    max_grad = max(u.numel_train for u in units) * itemsize
    return (depth + 2) * max_unit + 2 * max_grad


def _place_device(units, itemsize, gpu_budget, act_reserve, shards=1, forced=None, depth=None):
    """Params, then optimizer states, on the compute device while they fit. forced: per unit (params tier
    or None, states tier or None) fixed by overrides, placed first; depth: a fixed prefetch depth."""
    n = len(units)
    forced = forced or [(None, None)] * n
    gpu_cap = float("inf") if gpu_budget is None else gpu_budget - act_reserve
    if gpu_cap <= 0:
        raise BudgetError(f"gpu_memory={fmt_bytes(gpu_budget)} leaves nothing for model state after "
                          f"{fmt_bytes(act_reserve)} reserved for activations; raise gpu_memory")
    param_b = [u.numel * itemsize for u in units]
    params_home = ["cpu"] * n
    states_home = ["-" if u.numel_train == 0 else "cpu" for u in units]
    fixed_depth = depth is not None
    depth = depth if fixed_depth else STREAM_DEPTH
    stream_ws = stream_working_set(units, itemsize, depth)
    if stream_ws > gpu_cap and not fixed_depth:   # a tight budget: prefetch one unit ahead instead of two
        depth = 1
        stream_ws = stream_working_set(units, itemsize, depth)
    need = [device_state_bytes(u.numel_train // shards) if u.numel_train else 0 for u in units]
    # What overrides put on the device is placed first; the planner fills what is left.
    fixed = [i for i in range(n) if forced[i][0] == "gpu"]
    fixed_states = [i for i in range(n) if forced[i][1] == "gpu" and units[i].numel_train]
    held = sum(param_b[i] for i in fixed) + sum(need[i] for i in fixed_states)
    for i in fixed:
        params_home[i] = "gpu"
    for i in fixed_states:
        states_home[i] = "gpu"
    if sum(param_b) + sum(need[i] for i in fixed_states) <= gpu_cap and all(p in (None, "gpu") for p, _ in forced):
        params_home = ["gpu"] * n
        gpu_used = sum(param_b) + sum(need[i] for i in fixed_states)
    else:
        if stream_ws + held > gpu_cap:
            what = (f"the streaming working set of {fmt_bytes(stream_ws)} ({depth + 2} buffers of the largest "
                    f"unit, {fmt_bytes(max(param_b))}, plus its gradients)")
            if held:
                raise BudgetError(f"gpu_memory={fmt_bytes(gpu_budget)} cannot hold {what} beside the "
                                  f"{fmt_bytes(held)} overrides put on the device, after {fmt_bytes(act_reserve)} "
                                  f"kept for activations: {fmt_bytes(stream_ws + held - gpu_cap)} short; place "
                                  f"fewer units on the gpu")
            raise BudgetError(f"gpu_memory={fmt_bytes(gpu_budget)} cannot hold {what}; raise gpu_memory by "
                              f"{fmt_bytes(stream_ws - gpu_cap)}" + (" or lower prefetch_depth" if fixed_depth else ""))
        gpu_used = stream_ws + held
        for i in range(n):
            if forced[i][0] is None and gpu_used + param_b[i] <= gpu_cap:
                params_home[i] = "gpu"
                gpu_used += param_b[i]
    if gpu_used > gpu_cap:   # only what overrides fixed can overflow: the rest is placed while it fits
        raise BudgetError(f"overrides put {fmt_bytes(gpu_used)} on the device (model state and streaming "
                          f"buffers), {fmt_bytes(gpu_used - gpu_cap)} more than gpu_memory={fmt_bytes(gpu_budget)} "
                          f"leaves after {fmt_bytes(act_reserve)} kept for activations; place fewer units on the gpu")
    for i, u in enumerate(units):
        if u.numel_train and forced[i][1] is None and params_home[i] == "gpu" and gpu_used + need[i] <= gpu_cap:
            states_home[i] = "gpu"
            gpu_used += need[i]
    return params_home, states_home, stream_ws, depth


def device_state_bytes(numel_train, grads=True):
    """Device bytes of states kept there: fp32 master, m, v and (grads) the fp32 gradient the device AdamW
    reads at step(). Without it where the update runs as the gradients land (Note [device-tier update at
    landing] in engine.py): the fp32 gradient then goes through one shared chunk."""
    return numel_train * (STATE_BYTES + (DEVICE_GRAD_BYTES if grads else 0))


def _grad_bytes(u, params_home, states_home, itemsize, grad_accum, shards=1):
    """Host gradient buffers of one unit whose optimizer runs on the CPU."""
    if states_home in ("gpu", "-"):
        return 0
    train = u.numel_train // shards
    b = _a(train * itemsize)
    if grad_accum > 1:
        b += _a(train * 4)
    return b   # the CPU AdamW's output for the device is written over the gradients (tiers.Tiers._allocate_unit)


def _host_needs(units, params_home, states_home, itemsize, grad_accum, shards=1):
    grads = sum(_grad_bytes(u, params_home[i], states_home[i], itemsize, grad_accum, shards)
                for i, u in enumerate(units))
    host_params = [i for i in range(len(units)) if params_home[i] != "gpu"]
    host_states = [i for i in range(len(units)) if states_home[i] == "cpu"]
    param_b = [_a(u.numel // shards * itemsize) for u in units]
    state_b = [_a(u.numel_train // shards * STATE_BYTES) for u in units]
    max_state = max((state_b[i] for i in host_states), default=0)
    max_hparam = max((param_b[i] for i in host_params), default=0)
    staging = STATE_SLOTS * max_state + (STREAM_DEPTH + 2) * max_hparam
    everything = grads + sum(param_b[i] for i in host_params) + sum(state_b[i] for i in host_states)
    return grads, host_params, host_states, param_b, state_b, staging, everything


def host_memory_bounds(units, *, itemsize, gpu_budget, grad_accum, act_reserve=0, shards=1):
    """(smallest cpu_memory that works with an NVMe tier, cpu_memory that holds everything off-device), per rank."""
    params_home, states_home, _, _ = _place_device(units, itemsize, gpu_budget, act_reserve, shards)
    grads, _, _, _, _, staging, everything = _host_needs(units, params_home, states_home, itemsize, grad_accum,
                                                         shards)
    return grads + staging, everything


def plan_placement(units, *, itemsize, device, gpu_budget, cpu_budget, nvme, grad_accum, activations,
                   act_reserve=0, shards=1, forced=None, depth=None, disk_depth=None):
    """units: groups.Unit list (built with split_units(..., shards=shards)). Budgets in bytes (None =
    unbounded), per rank. forced, depth, disk_depth: what overrides fixed (_place_device; a deeper disk
    read-ahead gets the staging slots it needs). Returns a Plan or raises BudgetError."""
    n = len(units)
    forced = forced or [(None, None)] * n
    params_home, states_home, stream_ws, depth = _place_device(units, itemsize, gpu_budget, act_reserve, shards,
                                                               forced, depth)
    grads, host_params, host_states, param_b, state_b, staging, everything = _host_needs(
        units, params_home, states_home, itemsize, grad_accum, shards)
    cpu_cap = float("inf") if cpu_budget is None else cpu_budget
    param_slots = 0
    slots = STREAM_DEPTH + 2 if disk_depth is None else max(STREAM_DEPTH + 2, disk_depth + 1)   # +1: tiers' reserve
    staging += (slots - (STREAM_DEPTH + 2)) * max((param_b[i] for i in host_params), default=0)
    on_disk = [i for i in range(n) if "nvme" in forced[i]]
    if on_disk and not nvme:
        raise ConfigError(f"overrides put {units[on_disk[0]].name} on nvme, but no nvme paths are given")
    if everything <= cpu_cap and not on_disk:
        staging = 0
    else:
        if not nvme:
            raise BudgetError(
                f"cpu_memory={fmt_bytes(cpu_budget)} is {fmt_bytes(everything - cpu_cap)} short: "
                f"the CPU tier needs {fmt_bytes(everything)} (gradients {fmt_bytes(grads)}, "
                f"params {fmt_bytes(sum(param_b[i] for i in host_params))}, optimizer states "
                f"{fmt_bytes(sum(state_b[i] for i in host_states))}); raise cpu_memory or pass nvme=[paths]")
        room = cpu_cap - grads - staging
        if room < 0:
            raise BudgetError(
                f"cpu_memory={fmt_bytes(cpu_budget)} is {fmt_bytes(-room)} short of the minimum for "
                f"streaming from NVMe: gradient buffers {fmt_bytes(grads)} and staging {fmt_bytes(staging)}; "
                f"raise cpu_memory")
        for i in host_params:     # what overrides fixed first: on the disk, or held in host memory
            if forced[i][0] == "nvme":
                params_home[i] = "nvme"
            elif forced[i][0] == "cpu":
                room -= param_b[i]
        for i in host_states:
            if forced[i][1] == "nvme":
                states_home[i] = "nvme"
            elif forced[i][1] == "cpu":
                room -= state_b[i]
        if room < 0:
            raise BudgetError(f"cpu_memory={fmt_bytes(cpu_budget)} is {fmt_bytes(-room)} short of what overrides "
                              f"keep in host memory beside the gradient and staging buffers; move units to nvme")
        for i in host_params:
            if forced[i][0] is not None:
                continue
            if param_b[i] <= room:
                room -= param_b[i]
            else:
                params_home[i] = "nvme"
        for i in host_states:
            if forced[i][1] is not None:
                continue
            if state_b[i] <= room:
                room -= state_b[i]
            else:
                states_home[i] = "nvme"
        max_state = max((state_b[i] for i in range(n) if states_home[i] == "nvme"), default=0)
        max_hparam = max((param_b[i] for i in range(n) if params_home[i] == "nvme"), default=0)
        param_slots = slots if max_hparam else 0
        # Only what is really on disk needs staging; whatever that frees stays unused (never over budget).
        staging = STATE_SLOTS * max_state + param_slots * max_hparam

    tier_bytes = {"gpu": 0, "cpu": 0, "nvme": 0}
    for i, u in enumerate(units):
        tier_bytes[params_home[i]] += u.numel * itemsize // (1 if params_home[i] == "gpu" else shards)
        if states_home[i] != "-":
            tier_bytes[states_home[i]] += u.numel_train // shards * STATE_BYTES
    arena = (sum(param_b[i] for i in range(n) if params_home[i] == "cpu")
             + sum(state_b[i] for i in range(n) if states_home[i] == "cpu") + grads + staging)
    streamed = any(h != "gpu" for h in params_home)
    buffers = {"gpu_stream": stream_ws if streamed else 0, "cpu_grads": grads, "cpu_staging": staging,
               "cpu_arena": arena}
    plans = []
    for i, u in enumerate(units):
        act = activations if u.kind == "block" else "keep"
        plans.append(UnitPlan(u.name, u.numel, u.numel_train, params_home[i], states_home[i], act, shards=shards))
    plan = Plan(units=plans, bytes=tier_bytes, buffers=buffers,
                budgets={"gpu": gpu_budget, "cpu": cpu_budget, "nvme": None},
                prefetch_depth=depth, disk_prefetch_depth=disk_depth or depth + 2,
                param_slots=param_slots, device=device, itemsize=itemsize)
    plan.predicted_step_s, plan.bottleneck, plan.resource_s = predict_state_traffic(units, plans, itemsize)
    return plan


DEVICE_UPDATE_SHARE = None   # None: the planner balances CPU and device-side AdamW (tests force a share)
ACTIVATION_SHARE = 0.4   # of gpu_memory, on CUDA, kept free for activations and temporaries
MIN_ACTIVATION_SHARE = 0.1   # ... or less, down to this, when the streaming working set needs the rest
MAX_ACTIVATION_SHARE = 0.9   # ... or more, up to this, when a batch known ahead needs it (plan_for_batch)
SHARE_STEP = 0.05


def update_staging_bytes(units, device, *, eager, grad_accum, sharded=False, forced_share=None):
    """Device bytes for device-side AdamW's staging, or None where it does not apply: it needs each unit's
    update to run as soon as that unit's gradients are complete, so no clipping (eager=False: it needs every
    gradient first) and no accumulation window; not with several ranks (each rank's slice goes through the
    reduce-scatter path); and a GPU, unless a share is forced (DEVICE_UPDATE_SHARE in tests, or the
    device_update_share override) on the CPU, where "the device" is the CPU running the same code."""
    if not eager or grad_accum != 1 or sharded:
        return None
    if not str(device).startswith("cuda"):
        return 0 if DEVICE_UPDATE_SHARE is not None or forced_share is not None else None
    from .device_update import chunk_elems, staging_bytes
    return staging_bytes(chunk_elems(max((u.numel_train for u in units), default=1)))


def engine_placement(units, *, itemsize, device, gpu_budget, cpu_budget, nvme, grad_accum, activations,
                     rates, eager=True, shards=1, sharded=False, defer=True, overrides=NO_OVERRIDES):
    """The placement offload.engine() makes (the engine and `offload plan` both call this, so a plan printed
    ahead of time is the one a run gets): on CUDA ACTIVATION_SHARE of gpu_budget is kept for activations (the
    batch is not known yet); room for device-side AdamW's staging buffers is kept beside it where that applies
    and the budget allows (so states placed on the device cannot crowd it out); then assign_update_sites gives
    each side its share of AdamW (Note [device-side AdamW]). rates: a machine profile, or a callable returning
    one (called only on CUDA, where device-side AdamW's share and the prediction need it: measuring rates on a
    GPU takes a second, once a process). defer=False: the states placed on the device are shown there from
    the start (a caller that priced the batch's activations into the reserve), not held in host memory for
    the first step as the engine does. overrides: what the
    user fixed (offload/overrides.py); the rest is planned around it."""
    o = overrides
    cuda = str(device).startswith("cuda") and bool(gpu_budget)
    act_share = o.activation_share if o.activation_share is not None else ACTIVATION_SHARE
    act_reserve = int(gpu_budget * act_share) if cuda else 0
    full_cpu = cpu_budget
    if o.activation_host_bytes and cpu_budget is not None:   # kept free of optimizer state for activation copies
        if o.activation_host_bytes >= cpu_budget:
            raise ConfigError(f"overrides: activation_host_bytes={fmt_bytes(o.activation_host_bytes)} leaves nothing "
                              f"of cpu_memory={fmt_bytes(cpu_budget)} for the optimizer")
        cpu_budget -= o.activation_host_bytes
    kw = dict(itemsize=itemsize, device=str(device), gpu_budget=gpu_budget, cpu_budget=cpu_budget, nvme=nvme,
              grad_accum=grad_accum, activations=activations, shards=shards,
              forced=o.homes([u.name for u in units]), depth=o.prefetch_depth, disk_depth=o.disk_prefetch_depth)
    staging = update_staging_bytes(units, device, eager=eager, grad_accum=grad_accum, sharded=sharded,
                                   forced_share=o.device_update_share)
    if o.device_update_share and staging is None:
        raise ConfigError("overrides: device_update_share needs the device-side AdamW, which runs only without "
                          "clip_grad_norm, with grad_accum=1 and on one rank")
    try:
        plan, staging = _place_beside(units, act_reserve, staging, kw)
    except BudgetError:
        # Units so large that the streaming working set does not fit beside the usual share (a 175B block is
        # 3.4 GiB): activations get what the smallest working set leaves, if that is still a useful share.
        leftover = gpu_budget - stream_working_set(units, itemsize, 1) if cuda else -1
        if o.activation_share is not None or not MIN_ACTIVATION_SHARE * gpu_budget <= leftover < act_reserve:
            raise
        act_reserve = leftover
        plan, staging = _place_beside(units, act_reserve, staging, kw)
        plan.notes.append(f"activations keep {fmt_bytes(act_reserve)} of the device ({act_reserve / gpu_budget:.0%} of "
                          f"gpu_memory, not {ACTIVATION_SHARE:.0%}): the streaming working set needs the rest")
    if staging is not None:
        share = o.device_update_share if o.device_update_share is not None else DEVICE_UPDATE_SHARE
        assign_update_sites(plan, rates() if callable(rates) else rates, gpu_room=staging, share=share)
    elif o.device_update_share:
        raise ConfigError(f"overrides: device_update_share={o.device_update_share} leaves no room on the device for "
                          f"the device-side AdamW's staging buffers under gpu_memory={fmt_bytes(gpu_budget)}")
    elif cuda:   # priced at this machine's rates, not the defaults (a LoRA run's 6.8 s where 3.1 s was right)
        plan.predicted_step_s, plan.bottleneck, plan.resource_s = predict_state_traffic(
            units, plan.units, itemsize, rates() if callable(rates) else rates)
    plan.act_reserve = act_reserve
    plan.queue_depth = o.queue_depth or plan.queue_depth
    if cuda and not sharded and defer:
        defer_device_states(plan, units, cpu_budget, grad_accum, keep={n for n, (_, s) in o.units.items() if s})
    plan.budgets["cpu"] = full_cpu   # the activation copies' room is the budget less the arena
    return plan


PROMOTE_ARENA_UNITS = True   # Note [device states after the first step]: arena units may follow the deferred
DEVICE_TIER_AT_LANDING = True   # Note [device-tier update at landing] in engine.py (False: at step(), as before)


def defer_device_states(plan, units, cpu_budget, grad_accum, keep=()):
    """Holds the states placed on the device in the arena instead, for the first step, where the CPU budget
    allows (Note [device states after the first step]); marks them UnitPlan.promote and moves their bytes.
    keep: names of units whose states' home overrides fixed: they stay where they were put."""
    chosen = [(u, p) for u, p in zip(units, plan.units) if p.states_home == "gpu" and p.numel_train
              and p.name not in keep]
    grads = sum(_grad_bytes(u, "gpu", "cpu", plan.itemsize, grad_accum) for u, _ in chosen)
    states = sum(_a(p.numel_train * STATE_BYTES) for _, p in chosen)
    if not chosen or (cpu_budget is not None and plan.arena_bytes + grads + states > cpu_budget):
        return
    for _, p in chosen:
        p.states_home, p.promote = "cpu", True
        plan.bytes["gpu"] -= p.numel_train * STATE_BYTES
        plan.bytes["cpu"] += p.numel_train * STATE_BYTES
    plan.buffers["cpu_grads"] += grads
    plan.buffers["cpu_arena"] += grads + states
    plan.notes.append(f"gpu*: states of {len(chosen)} units ({fmt_bytes(states)}) start in host memory and move to "
                      f"the device after the first step, as far as its measured activations leave room and the "
                      f"CPU AdamW would not hide under backward")


# Note [device states after the first step]
# How much of the device activations need is known only once a step has run (batch, sequence, the loss's
# temporaries: a 32k-token batch's float logits alone take 4 GiB), so states placed on the device beside
# ACTIVATION_SHARE could crowd out a first step that needs more. Where host memory allows, those states start
# in the arena, updated by the CPU AdamW; after the first step (engine._promote_states) they move to the
# device, in placement order, while the step's reserved peak (act_auto.device_room) leaves room under
# gpu_memory and while the CPU AdamW's time exceeds what backward hides (otherwise the device bytes are worth
# more to activations: act_auto gets what is left). A unit that does not move stays a CPU-state unit; its arena bytes were held from the
# start, so nothing is allocated on the host later. Where every deferred unit moved and room is left, the
# arena's own units follow under the same rule (PROMOTE_ARENA_UNITS; engine._arena_candidates), first used
# first: the next forward needs the first blocks' updates first while backward finishes them last, so those
# updates are the ones the host AdamW and the link would still be working on when forward starts.


def _place_beside(units, act_reserve, staging, kw):
    """plan_placement with act_reserve (and device-side AdamW's staging, when given and the budget allows it)
    kept off the device's model state. Returns (plan, staging or None)."""
    if staging is not None:
        try:
            return plan_placement(units, act_reserve=act_reserve + staging, **kw), staging
        except BudgetError:
            pass                # too tight for the staging buffers: AdamW stays on the CPU
    return plan_placement(units, act_reserve=act_reserve, **kw), None


DEFAULT_RATES = {   # used until a probe of this machine is given: a PCIe 4 workstation with one NVMe SSD
    "pcie_gb_s": 25.0, "disk_gb_s": 2.0, "cpu_adam_gparams_s": 1.0,
}


def state_traffic_bytes(units, plans, itemsize, micro_batches=1):
    """Bytes (and AdamW elements) one optimizer step moves. Streamed params are fetched for forward and for
    backward of every micro-batch, and gradients leave the device after every micro-batch backward (the
    host accumulates them); updates, state reads and write-backs happen once per step. With several ranks,
    one rank's share: its slice crosses PCIe and the disk (the rest of a unit arrives by the all-gather, over
    the interconnect, which is not priced here)."""
    m = micro_batches
    fetch = update = disk_read = disk_write = adam = 0
    for u, p in zip(units, plans):
        k = getattr(p, "shards", 1)
        pb, tb = u.numel // k * itemsize, u.numel_train // k * itemsize
        if p.params_home != "gpu":
            fetch += 2 * pb * m                # forward and backward fetch
        if p.promote:
            pass                               # states on their way to the device: priced where they are headed
        elif p.update_on == "device":
            update += 2 * u.numel_train * STATE_BYTES   # master/m/v in and back out (Note [device-side AdamW])
        elif p.states_home in ("cpu", "nvme"):
            update += tb * m                   # gradients out
            adam += u.numel_train // k
            if p.params_home == "gpu":
                update += tb                   # updated params back in
        if p.params_home == "nvme":
            disk_read += 2 * pb * m            # read for forward and for backward
            disk_write += tb                   # the updated trainable part, once
        if p.states_home == "nvme":
            disk_read += u.numel_train // k * STATE_BYTES
            disk_write += u.numel_train // k * STATE_BYTES
    return {"pcie": fetch + update, "pcie_update": update, "disk_read": disk_read, "disk_write": disk_write,
            "adam_elems": adam}


def disk_seconds(read, write, r):
    """Seconds the disk needs for `read` and `write` bytes, with a machine profile r. Reads and writes share
    the SSDs. With the rate of both at once measured (disk_mixed_gb_s, on an equal mix), the part that pairs
    up (as many bytes read as written) goes at that rate and the rest of the larger kind at its own rate,
    never less than either kind alone; without it, their times add (separate read and write rates when the
    profile has them)."""
    if r.get("disk_read_gb_s") and r.get("disk_write_gb_s"):
        rr, ww = r["disk_read_gb_s"] * 1e9, r["disk_write_gb_s"] * 1e9
        alone = (read / rr, write / ww)
        if r.get("disk_mixed_gb_s"):
            both = min(read, write)
            paired = 2 * both / (r["disk_mixed_gb_s"] * 1e9) + (read - both) / rr + (write - both) / ww
            return max(paired, *alone)
        return sum(alone)
    return (read + write) / (r["disk_gb_s"] * 1e9)


def predict_state_traffic(units, plans, itemsize, rates=None):
    """Seconds per step each resource needs to move and update model state (compute excluded: it needs
    batch and sequence). Returns (the largest, its resource, all of them)."""
    r = dict(DEFAULT_RATES, **(rates or {}))
    b = state_traffic_bytes(units, plans, itemsize)
    res = {"pcie": b["pcie"] / (r["pcie_gb_s"] * 1e9), "disk": disk_seconds(b["disk_read"], b["disk_write"], r),
           "cpu_adam": b["adam_elems"] / (r["cpu_adam_gparams_s"] * 1e9)}
    worst = max(res, key=res.get)
    return res[worst], worst, res


def assign_update_sites(plan, rates, *, gpu_room, share=None):
    """Moves part of the CPU AdamW onto the compute device (Note [device-side AdamW]): units whose states are
    in the arena and whose params are resident there may have their states streamed through the device and
    updated by the fused kernel. share: the fraction of those elements to move (None: the one that balances
    the CPU AdamW against PCIe, from rates). gpu_room: device bytes free for the staging buffers. Updates
    plan in place (update_on, the host gradient buffers they no longer need, the prediction)."""
    from .device_update import chunk_elems, staging_bytes
    cand = [p for p in plan.units if p.states_home == "cpu" and p.params_home == "gpu" and p.numel_train
            and not p.promote]
    if not cand:
        return
    staging = staging_bytes(chunk_elems(max(p.numel_train for p in cand))) if plan.device.startswith("cuda") else 0
    if gpu_room < staging:
        return
    r = dict(DEFAULT_RATES, **{k: v for k, v in rates.items() if v is not None})
    total = sum(p.numel_train for p in cand)
    if share is None:
        # Per element: CPU seconds 1/cpu_rate; device-side, 12 B each way over one direction's rate minus the
        # 2 B gradient out and 2 B params in it no longer moves. PCIe also carries everything else it carries
        # now (base). The link's time is balanced against LINK_WINDOW of the CPU's (Note [device-side AdamW]).
        t_cpu = LINK_WINDOW / (r["cpu_adam_gparams_s"] * 1e9)
        one_way = min(r.get("pcie_h2d_gb_s") or r["pcie_gb_s"], r.get("pcie_d2h_gb_s") or r["pcie_gb_s"]) * 1e9
        t_dev = (STATE_BYTES - plan.itemsize) / one_way
        base = state_traffic_bytes(plan.units, plan.units, plan.itemsize)["pcie"] / 2 / one_way
        share = min(1.0, max(0.0, (total * t_cpu - base) / (t_cpu + t_dev) / total))
    if share <= 0:
        return
    moved = done = 0
    # Interleaved, so both resources get work all through backward. Giving the device side the units backward
    # reaches first instead left the CPU the late-landing ones and a late start: 0.732 s against 0.699 s on
    # the H200 reference step (bench/RESULTS.md, 2026-12-02).
    for p in cand:
        done += p.numel_train
        if moved < share * done:
            p.update_on = "device"
            moved += p.numel_train
    freed = sum(_grad_bytes(p, "gpu", "cpu", plan.itemsize, 1) for p in cand if p.update_on == "device")
    plan.buffers["cpu_grads"] -= freed
    plan.buffers["cpu_arena"] -= freed
    plan.buffers["gpu_adamw_staging"] = staging
    plan.predicted_step_s, plan.bottleneck, plan.resource_s = predict_state_traffic(
        plan.units, plan.units, plan.itemsize, rates)
    plan.notes.append(f"AdamW of {moved:,} of the {total:,} arena-state elements runs on the device, their "
                      f"states streamed through it (balancing the CPU AdamW against PCIe)")


# Note [device-side AdamW]
# Arena states can be updated by the CPU AdamW (the gradients go out, the updated compute-dtype params come
# back) or streamed through the compute device and updated there (12 B of master/m/v each way per element).
# The CPU is bound by host memory bandwidth and PCIe idles while params are resident, so the planner gives
# each a share (device_update.py); both then hide under compute far better than the CPU alone. Not equal
# times: the link's updates run in the order their gradients land and the next forward waits for its whole
# queue (Note [device-side update order]), so they have backward to run in, while the CPU AdamW, lowest unit
# first, runs on under the next forward (Note [update order] in optim.py). With recompute backward is 3 of
# the 4 forward passes' compute, so the link gets LINK_WINDOW = 3/4 of the CPU's time. Measured on the H200
# reference step (2026-12-02, 521370e, one machine, medians of 5 steps; shares of the arena elements): 0.30
# 0.554 s, 0.33 0.562 s, 0.36 0.578 s, 0.42 0.619 s; and 0.46, which equal times gave on another machine,
# 0.603 s against 0.556 s at 0.366 there. With 3/4 the planner gave 0.348 in run 737871c29356 (0f5bd9d):
# 0.551 s.
LINK_WINDOW = 0.75


# Note [step-time model]
# A step's resources overlap (compute, PCIe copies, disk I/O and CPU AdamW run on their own streams and
# threads), so the predicted step is the slowest of them, with one ordering constraint that no overlap
# removes (the CPU AdamW's late start, below). Each resource's time is its work over its rate from the
# machine profile:
# - gpu: training FLOPs 6*N*T (N: parameters in matmuls, T: tokens per step) plus attention's 12*L*h*s*T
#   (QK^T and AV, forward 4*L*h*s per token, backward twice that; causal masking is not discounted), plus
#   a recomputed forward 2*N_blocks*T + 4*L*h*s*T when blocks recompute; over gpu_tflops times
#   COMPUTE_EFFICIENCY. gpu_tflops is a large (8192^3) bf16 matmul; layer norms, softmax, cross-entropy,
#   elementwise ops and launch gaps bring a training step well below it. The efficiency is measured, not
#   guessed: plain PyTorch with the whole 3.37B reference model resident on an H200 and recompute took
#   0.584 s/step for 2.357e14 FLOPs at a measured 791 TFLOPS matmul rate: 0.51.
# - pcie: state_traffic_bytes()["pcie"] plus offloaded block inputs (out in forward, back in backward),
#   over one rate for both directions together (conservative: PCIe is full duplex).
# - disk: state_traffic_bytes() reads plus writes over the disk rates (they share the SSDs).
# - cpu_adam: the CPU AdamW's busy time. The native AdamW is bound by host memory bandwidth: per element it
#   reads master, m, v and a 16-bit gradient and writes master, m, v and 16-bit params (ADAM_HOST_BYTES =
#   28; 4.65 G elements/s is 130 GB/s on the H200 machine). The optimizer's PCIe copies (gradients out,
#   params in, device-side AdamW's states both ways) are DMA into and out of the same host memory while
#   AdamW runs, so they are priced in AdamW's bytes at its bandwidth: (elements * 28 + update DMA bytes) /
#   (rate * 28). Streamed-parameter fetches are spread over the whole step and left to the pcie term.
# - the late start: in the engine's eager mode a unit's AdamW runs when its gradients land in backward, and
#   the next forward needs the first units first, which backward finishes last; so the CPU works only from
#   the moment the first host-updated unit's gradients land (the whole forward, then the backward of the
#   units after it in module order: cpu_start_s, priced as that share of the gpu time, each unit's share
#   of backward being its parameters' share) to the end of the step. The step is at least cpu_start_s plus
#   cpu_adam. With micro_batches > 1 the gradients of the last micro-batch start it.
# Checked against the H200 reference runs (3.37B, seq 2048, mb 4, 24 GiB cap): all 2.93 G arena elements
# on the CPU: predicted 0.87 s, measured 0.843; 1.25 G of them updated on the device: predicted 0.82 s,
# measured 0.745 (tests/test_planner.py works both through). Not modelled: clipping's deferred updates
# (they overlap the next forward instead), contention between disk DMA and AdamW, kernel-launch overhead of
# many small units.
COMPUTE_EFFICIENCY = 0.51
ADAM_HOST_BYTES = 28   # host memory bytes the native AdamW touches per element (Note [step-time model])
LAYER_ACT_BYTES = 34   # bytes per token per hidden unit a block saves for backward in 16-bit (Korthikanti
                       # et al. 2022, eq. 1, without the 5as/h term: SDPA/flash attention keeps no scores)
LOGIT_EXTRA_BYTES = 12  # per logit beside the compute-dtype copy, at the loss's backward peak: the fp32
                        # log-softmax saved for backward, its fp32 gradient and the fp32 gradient of its input.
                        # Measured: Hugging Face LLaMA at 16 x 2048 x 32000 under a 24 GiB cap held 9.3 B a logit
                        # in the loss's backward and ran out asking for 4 more (a 3.9 GiB fp32 tensor): 13.3 B
                        # at least


@dataclass(frozen=True)
class ActivationPlan:
    """How saved activations of one micro-batch are held. policy: "keep" (all on the device), "recompute"
    (block inputs on the device, one block re-run at a time), "recompute+offload" (block inputs in host
    memory, copied out in forward and back in backward). device_bytes: the device reserve it needs;
    host_bytes: block inputs held in host memory."""
    policy: str
    device_bytes: int
    host_bytes: int = 0
    host_pinned: int = 0     # what host_bytes take pinned: torch's pinned allocator rounds each block up to 2^k

    @property
    def host_room(self):
        """Host memory it needs beside the arena."""
        return max(self.host_pinned, self.host_bytes)

    @property
    def recompute(self):
        return self.policy != "keep"


def activation_options(shape, batch, itemsize):
    """ActivationPlans from most to least device memory, for micro-batches of batch x shape.seq tokens."""
    tok = batch * shape.seq
    block = LAYER_ACT_BYTES * tok * shape.hidden * itemsize // 2
    block_in = tok * shape.hidden * itemsize
    logits = tok * shape.vocab * (itemsize + LOGIT_EXTRA_BYTES)
    pinned = pinned_bytes(block_in)
    return [ActivationPlan("keep", shape.layers * block + logits),
            ActivationPlan("recompute", shape.layers * block_in + block + logits),
            ActivationPlan("recompute+offload", 2 * block_in + block + logits, shape.layers * block_in,
                           shape.layers * pinned)]


def plan_for_batch(units, shape, batch, rates=None, micro_batches=1, **kw):
    """engine_placement (the plan offload.engine() builds for these budgets) and the ActivationPlan a batch of
    batch x shape.seq tokens gets inside the engine's activation reserve: the fastest predicted one when rates
    has gpu_tflops, else the one keeping most on the device; on the CPU (no device reserve) "keep". Where no
    policy fits the engine's default placement, the placement that makes one fit (_refit; Plan.batch_overrides
    says what to pass to engine()). kw: engine_placement's keywords, rates defaulting to `rates`. Returns
    (Plan, ActivationPlan); raises BudgetError when the placement does not fit or no activation policy fits."""
    kw.setdefault("rates", dict(DEFAULT_RATES, **{k: v for k, v in (rates or {}).items() if v is not None}))
    plan = engine_placement(units, defer=False, **kw)   # the batch is priced: the steady state is shown
    opts = activation_options(shape, batch, kw["itemsize"])
    if not str(kw["device"]).startswith("cuda"):
        return plan, opts[0]
    priced = bool(rates and rates.get("gpu_tflops"))
    tokens = batch * shape.seq * micro_batches

    def step_s(p, a):
        return predict_step(p, shape, tokens, rates, a, micro_batches).step_s

    def best(p, fits):
        return min(fits, key=lambda a: step_s(p, a)) if priced else fits[0]
    fits = _fitting(units, plan, opts, kw)
    if fits:
        act = best(plan, fits)
        return _after_first_step(units, plan, act, shape, tokens, kw, micro_batches) if priced else plan, act
    found = _refit(units, plan, opts, kw) if plan.budgets.get("gpu") else []
    if not found:
        raise BudgetError(_no_fit_reason(units, plan, opts, kw, batch, shape))
    cand, added, fits = min(found, key=lambda f: step_s(f[0], best(f[0], f[2]))) if priced else found[0]
    act = best(cand, fits)
    if priced:
        ckw = dict(kw, overrides=replace(kw.get("overrides", NO_OVERRIDES), **added))
        cand = _after_first_step(units, cand, act, shape, tokens, ckw, micro_batches)
    cand.batch_overrides = added
    gpu = cand.budgets["gpu"]
    if "activation_share" in added:
        cand.notes.append(f"batch {batch} x seq {shape.seq}: activations need more than the "
                          f"{plan.act_reserve / gpu:.0%} of gpu_memory the engine keeps for them without knowing the "
                          f"batch, so this plan keeps {added['activation_share']:.0%}")
    if "activation_host_bytes" in added:
        cand.notes.append(f"batch {batch} x seq {shape.seq}: the block inputs wait in host memory, so the plan keeps "
                          f"{fmt_bytes(added['activation_host_bytes'])} of cpu_memory free of optimizer state for "
                          f"them (more states on the disk)")
    cand.notes.append(f"a run gets this plan with engine(..., activations={act.policy!r}) and, in its overrides, "
                      + ", ".join(f"{k!r}: {v}" for k, v in added.items()))
    return cand, act


def _after_first_step(units, plan, act, shape, tokens, kw, micro_batches):
    """The placement a run holds from its second step on, where the engine's choice after the first step
    (engine._plan_promotion) leaves states planned for the device in host memory: with activations "auto",
    the states deferred to the arena for the first step move onto the device, in placement order, only while
    the CPU AdamW of what stays on the host would not hide under backward; the device room they would take
    goes to activations instead. Priced here with the step model's forward (the engine times the first
    step's). plan unchanged where every deferred unit moves."""
    from . import act_auto
    rates = kw["rates"]
    if kw.get("activations") != "auto" or not rates.get("cpu_adam_gparams_s"):
        return plan
    held = engine_placement(units, defer=True, **kw)
    deferred = [p for p in held.units if p.promote]
    if not deferred:
        return plan
    model_flops, _ = training_flops(shape, tokens, act.recompute)
    fwd_s = model_flops / 3 / micro_batches / (rates["gpu_tflops"] * 1e12 * COMPUTE_EFFICIENCY)
    hides_s = act_auto.backward_hides_s(fwd_s)
    rate = rates["cpu_adam_gparams_s"] * 1e9
    host = sum(p.numel_train // p.shards for p in held.units
               if p.states_home in ("cpu", "nvme") and p.update_on == "host")
    moved, host = promoted_states(deferred, host, rate, hides_s, lambda p: p.numel_train // p.shards)
    stay = len(deferred) - len(moved)
    if not stay:
        return plan
    for p in deferred:
        p.promote = False
    for p in moved:
        p.states_home = "gpu"
        held.bytes["gpu"] += p.numel_train * STATE_BYTES
        held.bytes["cpu"] -= p.numel_train * STATE_BYTES
    held.notes = [n for n in held.notes if not n.startswith("gpu*:")] + [
        f"after the first step the engine keeps the states of {stay} of the {len(deferred)} units planned for the "
        f"device in host memory: the CPU AdamW of what stays there ({host / rate:.3f} s) hides under backward "
        f"({hides_s:.3f} s), so the device room goes to activations"]
    return held


def promoted_states(deferred, host, rate, hides_s, elems, fits=lambda d: True, on_cpu=lambda d: True):
    """The rule of Note [device states after the first step], which engine._plan_promotion applies after the
    first step and plan_for_batch predicts: walking the units in order, one moves onto the device where
    fits(it) (the caller's device room, which a True answer claims) unless the CPU AdamW updates it
    (on_cpu(unit); a device-side update's state traffic is the link's, whatever the CPU does) and the CPU
    AdamW of what stays on the host (host elements at rate elements/s) already hides under backward
    (hides_s; None: never counted as hidden). elems(unit): its elements the CPU AdamW would update. Returns
    (the units that move, the host elements left)."""
    moved = []
    for d in deferred:
        if on_cpu(d) and hides_s is not None and host / rate <= hides_s:
            continue
        if fits(d):
            moved.append(d)
            host -= elems(d)
    return moved, host


def _engine_arena(units, kw):
    """The arena offload.engine() holds with these arguments: its placement defers the states planned for the
    device into the arena for the first step (defer_device_states), and those bytes stay held."""
    return engine_placement(units, defer=True, **kw).arena_bytes


def _fitting(units, plan, opts, kw):
    """The ActivationPlans that fit plan's activation reserve and the host memory the engine's arena leaves
    (kw: the engine_placement arguments plan was made with)."""
    device_ok = [a for a in opts if a.device_bytes <= plan.act_reserve]
    cpu = plan.budgets.get("cpu")
    if cpu is None or not any(a.host_room for a in device_ok):
        return device_ok
    room = cpu - _engine_arena(units, kw)
    return [a for a in device_ok if a.host_room <= room]


def _refit(units, plan, opts, kw):
    """Where none of the batch's ActivationPlans fits the engine's default placement (made without knowing the
    batch): placements that make one fit, as [(Plan, the overrides added, the ActivationPlans that fit)], in
    order of the device share they take. They keep a larger share of the device for activations, in steps of
    SHARE_STEP up to MAX_ACTIVATION_SHARE (less model state there); and where the block inputs of
    "recompute+offload" find no room in host memory beside the arena, they keep that much of cpu_memory free
    of optimizer state (overrides activation_host_bytes; more states on the disk). A share or host reserve
    the user fixed is not changed."""
    gpu, cpu = plan.budgets["gpu"], plan.budgets.get("cpu")
    o = kw.get("overrides", NO_OVERRIDES)
    shares = [None]             # the engine's own reserve
    if o.activation_share is None:
        first = max(plan.act_reserve / gpu,
                    math.ceil(min(a.device_bytes for a in opts) / gpu / SHARE_STEP - 1e-9) * SHARE_STEP)
        while first <= MAX_ACTIVATION_SHARE + 1e-9:
            shares.append(round(first, 2))
            first += SHARE_STEP
    holds = [None]
    if cpu is not None and o.activation_host_bytes is None and opts[-1].host_room:
        holds.append(opts[-1].host_room)
    found = []
    for share in shares:
        for hold in holds:
            if share is None and hold is None:
                continue        # the plan at hand
            added = {k: v for k, v in (("activation_share", share), ("activation_host_bytes", hold)) if v is not None}
            ckw = dict(kw, overrides=replace(o, **added))
            try:
                cand = engine_placement(units, defer=False, **ckw)
            except (BudgetError, ConfigError):
                continue
            fits = _fitting(units, cand, opts, ckw)
            if fits:
                found.append((cand, added, fits))
    return found


def _no_fit_reason(units, plan, opts, kw, batch, shape):
    """Why no placement fits the batch's activations: the device, or the host memory of the block inputs."""
    o = kw.get("overrides", NO_OVERRIDES)
    gpu = plan.budgets["gpu"]
    head = f"batch {batch} x seq {shape.seq}: "
    if o.activation_share is not None:
        return (head + f"activations need at least {fmt_bytes(min(a.device_bytes for a in opts))} of the device (with "
                f"recompute and block inputs in host memory), more than the {fmt_bytes(plan.act_reserve)} overrides' "
                f"activation_share={o.activation_share} keeps for them, or host memory for the block inputs is short; "
                f"raise activation_share or lower --batch")
    # the most any share could keep: the smallest streaming working set needs its room whatever the share
    top = max(plan.act_reserve, min(MAX_ACTIVATION_SHARE * gpu, gpu - stream_working_set(units, plan.itemsize, 1)))
    if opts[-1].device_bytes <= top and opts[-1].host_bytes:
        return (head + f"with recompute, the block inputs need {fmt_bytes(opts[-2].device_bytes)} of the device, more "
                f"than any share of gpu_memory up to {MAX_ACTIVATION_SHARE:.0%} leaves beside the model state, or "
                f"{fmt_bytes(opts[-1].host_room)} in host memory, more than cpu_memory leaves beside the optimizer "
                f"arena; raise cpu_memory" + ("" if kw.get("nvme") else ", give the engine a disk (nvme) for "
                                               "optimizer states") + ", or lower --batch")
    return (head + f"even with recompute and block inputs in host memory activations need "
            f"{fmt_bytes(opts[-1].device_bytes)} of the device, more than the {fmt_bytes(plan.act_reserve)} the engine "
            f"keeps for them ({plan.act_reserve / gpu:.0%} of gpu_memory), and no larger share up to "
            f"{MAX_ACTIVATION_SHARE:.0%} leaves room for the model state; lower --batch (raise --grad-accum to keep "
            f"the tokens per step) or raise gpu_memory")


@dataclass(frozen=True)
class StepPrediction:
    """One step priced on a machine profile (Note [step-time model])."""
    tokens: int
    model_flops: float       # 6NT + attention: the convention papers report TFLOPS in
    hardware_flops: float    # model_flops plus the recomputed forward
    resource_s: dict
    step_s: float
    bottleneck: str
    cpu_start_s: float = 0.0   # when the first host-updated unit's gradients land (the CPU AdamW's start)

    @property
    def model_tflops(self):
        return self.model_flops / self.step_s / 1e12

    @property
    def hardware_tflops(self):
        return self.hardware_flops / self.step_s / 1e12


def training_flops(shape, tokens, recompute):
    """(model FLOPs, FLOPs including a recomputed forward) of a step of `tokens` tokens."""
    attn = 4 * shape.layers * shape.hidden * shape.seq * tokens       # one forward's QK^T and AV
    model = 6 * shape.compute_params * tokens + 3 * attn
    extra = (2 * shape.block_params * tokens + attn) if recompute else 0
    return float(model), float(model + extra)


def cpu_start_share(plan, shape, model_flops, hardware_flops, micro_batches=1):
    """Share of the step's compute done before the first host-updated unit's gradients land (Note
    [step-time model]): every micro-batch but the last, the last one's forward, and the backward of the units
    from the last host-updated one on (module order), each unit's backward its parameters' share. None when no
    unit's AdamW runs on the CPU."""
    host = [i for i, p in enumerate(plan.units)
            if p.numel_train and p.states_home in ("cpu", "nvme") and p.update_on == "host"]
    if not host or not hardware_flops:
        return None
    m = micro_batches
    fwd = model_flops / 3 / m                 # one micro-batch's forward: 2NT + attention, a third of 6NT + 3x
    one = hardware_flops / m
    after = sum(p.numel for p in plan.units[host[-1]:])
    frac = min(1.0, after / max(1, shape.compute_params))
    return ((m - 1) * one + fwd + frac * (one - fwd)) / hardware_flops


def predict_step(plan, shape, tokens_per_step, rates, act=None, micro_batches=1):
    """StepPrediction of a plan (Note [step-time model]); rates: a machine profile (missing keys fall back to
    DEFAULT_RATES; gpu_tflops is required)."""
    r = dict(DEFAULT_RATES, **{k: v for k, v in (rates or {}).items() if v is not None})
    if not r.get("gpu_tflops"):
        raise ValueError("predict_step: the machine profile has no gpu_tflops")
    model, hw = training_flops(shape, tokens_per_step, act is not None and act.recompute)
    b = state_traffic_bytes(plan.units, plan.units, plan.itemsize, micro_batches)
    pcie = b["pcie"] + (2 * act.host_bytes * micro_batches if act is not None else 0)
    eff = r.get("compute_efficiency", COMPUTE_EFFICIENCY)
    host_rate = r["cpu_adam_gparams_s"] * 1e9 * ADAM_HOST_BYTES
    adam = (b["adam_elems"] * ADAM_HOST_BYTES + b["pcie_update"]) / host_rate if b["adam_elems"] else 0.0
    res = {"gpu": hw / (r["gpu_tflops"] * 1e12 * eff), "pcie": pcie / (r["pcie_gb_s"] * 1e9),
           "disk": disk_seconds(b["disk_read"], b["disk_write"], r), "cpu_adam": adam}
    worst = max(res, key=res.get)
    share = cpu_start_share(plan, shape, model, hw, micro_batches)
    start = res["gpu"] * share if share is not None else 0.0
    step, bottleneck = res[worst], worst
    if share is not None and start + adam > step:
        step, bottleneck = start + adam, "cpu_adam"
    return StepPrediction(tokens_per_step, model, hw, res, step, bottleneck, start)
