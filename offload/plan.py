"""Placement of every unit's state across the tiers, under the budgets, before any work starts.

Per unit the plan places the compute-dtype parameters ("params") and the fp32 master weights with the two
AdamW moments ("states"). Principles (DESIGN.md): the compute device first, then the CPU arena, then NVMe;
spill only what does not fit; refuse impossible budgets up front, saying by how much they fall short.

Byte accounting (all of it is what tiers.py allocates, so the arena budget is exact):
- compute device: resident params (numel * itemsize), device states (16 B per trainable element: master,
  m, v and an fp32 gradient), and for streamed units a working set of (depth + 2) flat buffers plus two
  gradient buffers of the largest unit.
- CPU arena: a gradient buffer per unit whose optimizer runs on the CPU (compute dtype; plus an fp32
  accumulator when grad_accum > 1), an output buffer for device-resident params updated on the CPU,
  params homes, states, and NVMe staging slots when anything lives on disk.
"""
from dataclasses import dataclass, field

from .errors import BudgetError
from .sizes import fmt_bytes

ARENA_ALIGN = 4096
HUGE_PAGE = 2 << 20
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
    state_slots: int = 3
    param_slots: int = 0
    device: str = "cpu"
    predicted_step_s: float = None
    bottleneck: str = None
    notes: list = field(default_factory=list)

    @property
    def arena_bytes(self):
        return self.buffers["cpu_arena"]

    def __str__(self):
        lines = [f"offload plan on {self.device}: {len(self.units)} units",
                 f"{'tier':<6}{'model state':>14}{'budget':>14}"]
        for tier in ("gpu", "cpu", "nvme"):
            b = self.budgets.get(tier)
            lines.append(f"{tier:<6}{fmt_bytes(self.bytes[tier]):>14}{(fmt_bytes(b) if b is not None else '-'):>14}")
        lines.append("buffers: " + ", ".join(f"{k}={fmt_bytes(v)}" for k, v in self.buffers.items()))
        lines.append(f"prefetch depth {self.prefetch_depth} (host->device), {self.disk_prefetch_depth} (disk->host)")
        if self.predicted_step_s is not None:
            lines.append(f"predicted optimizer/transfer time per step {self.predicted_step_s:.3f} s, "
                         f"bottleneck {self.bottleneck}")
        lines.append(f"{'unit':<28}{'elements':>14}  params  states  activations")
        shown = self.units if len(self.units) <= 12 else self.units[:5] + [None] + self.units[-5:]
        for u in shown:
            if u is None:
                lines.append(f"{'...':<28}")
                continue
            lines.append(f"{u.name[:27]:<28}{u.numel:>14,}  {u.params_home:<6}  {u.states_home:<6}  {u.activations}")
        lines += self.notes
        return "\n".join(lines)


def plan_placement(units, *, itemsize, device, gpu_budget, cpu_budget, nvme, grad_accum, activations,
                   act_reserve=0):
    """units: groups.Unit list. Budgets in bytes (None = unbounded). Returns a Plan or raises BudgetError."""
    streamed_depth = 2
    param_b = [u.numel * itemsize for u in units]
    state_b = [u.numel_train * STATE_BYTES for u in units]
    total_params, total_states = sum(param_b), sum(state_b)
    gpu_cap = float("inf") if gpu_budget is None else gpu_budget - act_reserve
    if gpu_cap <= 0:
        raise BudgetError(f"gpu_memory={fmt_bytes(gpu_budget)} leaves nothing for model state after "
                          f"{fmt_bytes(act_reserve)} reserved for activations; raise gpu_memory")
    n = len(units)
    params_home = ["cpu"] * n
    states_home = ["-" if u.numel_train == 0 else "cpu" for u in units]
    max_unit = max(param_b)
    max_grad = max(u.numel_train for u in units) * itemsize
    stream_ws = (streamed_depth + 2) * max_unit + 2 * max_grad

    # 1. The compute device: every param resident if it fits, else a streaming working set and as many
    #    resident units as fit beside it; then optimizer states for resident units while room remains.
    if total_params <= gpu_cap:
        params_home = ["gpu"] * n
        gpu_used = total_params
    else:
        if stream_ws > gpu_cap:
            raise BudgetError(
                f"gpu_memory={fmt_bytes(gpu_budget)} cannot hold the streaming working set of "
                f"{fmt_bytes(stream_ws)} ({streamed_depth + 2} buffers of the largest unit, "
                f"{fmt_bytes(max_unit)}, plus its gradients); raise gpu_memory by "
                f"{fmt_bytes(stream_ws - gpu_cap)}")
        gpu_used = stream_ws
        for i in range(n):
            if gpu_used + param_b[i] <= gpu_cap:
                params_home[i] = "gpu"
                gpu_used += param_b[i]
    for i, u in enumerate(units):
        need = u.numel_train * (STATE_BYTES + DEVICE_GRAD_BYTES)
        if u.numel_train and params_home[i] == "gpu" and gpu_used + need <= gpu_cap:
            states_home[i] = "gpu"
            gpu_used += need

    # 2. The CPU arena: buffers first (they are needed whatever else fits), then params, then states.
    def grad_bytes(i):
        if states_home[i] in ("gpu", "-"):
            return 0
        b = _a(units[i].numel_train * itemsize)
        if grad_accum > 1:
            b += _a(units[i].numel_train * 4)
        if params_home[i] == "gpu":
            b += _a(units[i].numel_train * itemsize)  # CPU AdamW output, copied to the device
        return b

    grads = sum(grad_bytes(i) for i in range(n))
    host_params = [i for i in range(n) if params_home[i] != "gpu"]
    host_states = [i for i in range(n) if states_home[i] == "cpu"]
    need_all = grads + sum(_a(param_b[i]) for i in host_params) + sum(_a(state_b[i]) for i in host_states)
    cpu_cap = float("inf") if cpu_budget is None else cpu_budget
    staging = 0
    param_slots = 0
    if _round_huge(need_all) > cpu_cap:
        if not nvme:
            raise BudgetError(
                f"cpu_memory={fmt_bytes(cpu_budget)} is {fmt_bytes(_round_huge(need_all) - cpu_cap)} short: "
                f"the CPU tier needs {fmt_bytes(_round_huge(need_all))} (gradients {fmt_bytes(grads)}, "
                f"params {fmt_bytes(sum(param_b[i] for i in host_params))}, optimizer states "
                f"{fmt_bytes(sum(state_b[i] for i in host_states))}); raise cpu_memory or pass nvme=[paths]")
        # Staging for disk-resident units: slots for states (read ahead, update, write behind) and params.
        max_state = max((state_b[i] for i in host_states), default=0)
        max_hparam = max((param_b[i] for i in host_params), default=0)
        param_slots = streamed_depth + 2
        staging = 3 * _a(max_state) + param_slots * _a(max_hparam)
        room = (cpu_cap // HUGE_PAGE) * HUGE_PAGE - grads - staging   # the arena maps whole 2 MiB pages
        if room < 0:
            raise BudgetError(
                f"cpu_memory={fmt_bytes(cpu_budget)} is {fmt_bytes(-room)} short of the minimum for "
                f"streaming from NVMe: gradient buffers {fmt_bytes(grads)} and staging {fmt_bytes(staging)}; "
                f"raise cpu_memory")
        for i in host_params:
            if _a(param_b[i]) <= room:
                room -= _a(param_b[i])
            else:
                params_home[i] = "nvme"
        for i in host_states:
            if _a(state_b[i]) <= room:
                room -= _a(state_b[i])
            else:
                states_home[i] = "nvme"
        if not any(h == "nvme" for h in params_home + states_home):
            staging = 0
        if not any(h == "nvme" for h in params_home):
            staging -= param_slots * _a(max_hparam)
            param_slots = 0

    tier_bytes = {"gpu": 0, "cpu": 0, "nvme": 0}
    for i in range(n):
        tier_bytes[params_home[i]] += param_b[i]
        if states_home[i] != "-":
            tier_bytes[states_home[i]] += state_b[i] + (DEVICE_GRAD_BYTES * units[i].numel_train
                                                        if states_home[i] == "gpu" else 0)
    # Device tier bytes count the fp32 device gradient as state only for the budget check above; report
    # model state (params + master/m/v) per tier.
    for i in range(n):
        if states_home[i] == "gpu":
            tier_bytes["gpu"] -= DEVICE_GRAD_BYTES * units[i].numel_train
    arena = sum(_a(param_b[i]) for i in range(n) if params_home[i] == "cpu") + \
        sum(_a(state_b[i]) for i in range(n) if states_home[i] == "cpu") + grads + staging
    streamed = any(h != "gpu" for h in params_home)
    buffers = {"gpu_stream": stream_ws if streamed else 0, "cpu_grads": grads, "cpu_staging": staging,
               "cpu_arena": arena}
    plans = []
    for i, u in enumerate(units):
        act = activations if u.kind == "block" else "keep"
        plans.append(UnitPlan(u.name, u.numel, u.numel_train, params_home[i], states_home[i], act))
    return Plan(units=plans, bytes=tier_bytes, buffers=buffers,
                budgets={"gpu": gpu_budget, "cpu": cpu_budget, "nvme": None},
                prefetch_depth=streamed_depth, disk_prefetch_depth=streamed_depth + 2,
                param_slots=param_slots, device=device)


def _round_huge(n):
    return -(-int(n) // HUGE_PAGE) * HUGE_PAGE
