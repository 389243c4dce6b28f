"""What a user may decide instead of the planner: engine(..., overrides={...}).

The planner chooses every placement, depth and share itself (plan.py); none of them is a knob a user must
set. Each can still be overridden, for an experiment or a machine the probe misjudges, and the planner then
plans the rest around what was fixed and checks the result against the budgets like any plan:

    offload.engine(model, gpu_memory="24GiB", cpu_memory="64GiB", nvme="/mnt/nvme/offload", overrides={
        "units": {"model.layers.0": {"params": "gpu", "states": "gpu"},   # a unit's homes, by unit name
                  "lm_head": {"states": "nvme"}},                          # (one of them alone is fine)
        "prefetch_depth": 3,          # units copied host->device ahead of use
        "disk_prefetch_depth": 6,     # units read from the disk ahead of use
        "queue_depth": 64,            # the disk store's requests in flight
        "activation_share": 0.3,      # of gpu_memory kept for activations until the first step measures them
                                      # (on a GPU; on the CPU nothing is kept)
        "activation_host_bytes": 8 << 30,   # of cpu_memory kept free of optimizer state for activation copies
                                      # (recompute+offload's block inputs, swaps); `offload plan --batch` says
                                      # when a batch needs it
        "device_update_share": 0.5,   # of the host-held AdamW elements updated on the GPU instead of the CPU
                                      # (where the device-side AdamW applies and has room)
    })

Unit names are those of engine.plan's table (`offload plan` prints them before any run).
"""
from dataclasses import dataclass, field

from .errors import ConfigError

TIERS = ("gpu", "cpu", "nvme")
KEYS = ("units", "prefetch_depth", "disk_prefetch_depth", "queue_depth", "activation_share", "device_update_share",
        "activation_host_bytes")


@dataclass(frozen=True)
class Overrides:
    units: dict = field(default_factory=dict)   # unit name -> (params tier or None, states tier or None)
    prefetch_depth: int = None
    disk_prefetch_depth: int = None
    queue_depth: int = None
    activation_share: float = None
    device_update_share: float = None
    activation_host_bytes: int = None

    def homes(self, names):
        """Per unit (in `names` order): (params tier or None, states tier or None)."""
        return [self.units.get(n, (None, None)) for n in names]


NONE = Overrides()


def _positive_int(value, key, problems, most=None):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1 or (most is not None and value > most):
        problems.append(f"{key}={value!r}: an integer from 1" + (f" to {most}" if most else ""))
        return None
    return value


def _share(value, key, problems, low_open):
    """A share in (0, 1) (low_open) or [0, 1]."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and \
        (0 < value < 1 if low_open else 0 <= value <= 1)
    if not ok:
        problems.append(f"{key}={value!r}: a number in {'(0, 1)' if low_open else '[0, 1]'}")
        return None
    return float(value)


def parse_overrides(spec, unit_names, frozen=()):
    """Overrides from engine()'s `overrides` dict; ConfigError naming every problem at once. unit_names:
    the model's units in order; frozen: names of units without trainable parameters (no states to place)."""
    if spec is None:
        return NONE
    if isinstance(spec, Overrides):
        return spec
    if not isinstance(spec, dict):
        raise ConfigError(f"overrides must be a dict with keys among {', '.join(KEYS)}; got {type(spec).__name__}")
    problems = [f"unknown key {k!r}" for k in spec if k not in KEYS]
    units = {}
    given = spec.get("units", {})
    if not isinstance(given, dict):
        problems.append("units: a dict of unit name -> {'params': tier, 'states': tier}")
        given = {}
    known = set(unit_names)
    for name, homes in given.items():
        if name not in known:
            close = [n for n in unit_names if str(name) in n or n in str(name)][:3]
            problems.append(f"units: no unit named {name!r}" + (f" (did you mean {', '.join(close)}?)" if close else
                                                                 f"; units are {', '.join(unit_names[:4])}..."))
            continue
        if not isinstance(homes, dict) or not homes or set(homes) - {"params", "states"}:
            problems.append(f"units[{name!r}]: a dict with 'params' and/or 'states'")
            continue
        params, states = homes.get("params"), homes.get("states")
        for what, tier in (("params", params), ("states", states)):
            if tier is not None and tier not in TIERS:
                problems.append(f"units[{name!r}][{what!r}]={tier!r}: one of {', '.join(TIERS)}")
        if states is not None and name in frozen:
            problems.append(f"units[{name!r}]: the unit has no trainable parameters, so no states to place")
        if states == "gpu" and params is None:
            params = "gpu"    # the device AdamW updates the params in place, so they live beside the states
        if states == "gpu" and params != "gpu":
            problems.append(f"units[{name!r}]: states on the gpu need the params there too")
        units[name] = (params, states)
    checks = {"prefetch_depth": (_positive_int, 16), "disk_prefetch_depth": (_positive_int, 64),
              "queue_depth": (_positive_int, 4096), "activation_share": (_share, True),
              "device_update_share": (_share, False),
              "activation_host_bytes": (_positive_int, None)}   # key: (check, its bound or whether 0 is refused)
    out = Overrides(units=units, **{k: check(spec[k], k, problems, arg) for k, (check, arg) in checks.items()
                                    if k in spec})
    if problems:
        raise ConfigError("overrides: " + "; ".join(problems))
    return out
