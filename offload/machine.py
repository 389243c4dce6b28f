"""The rates the engine plans with: a machine profile (`offload probe -o FILE`, named by OFFLOAD_MACHINE),
or, on a GPU, a quick measurement of the few rates placement depends on, made once per process.

On the CPU (tests, CI) nothing is measured: placement there does not depend on rates, and the planner's
defaults price the prediction.
"""
import os

from .plan import DEFAULT_RATES
from .probe import adam_native_rate, gpu_rates, load_profile

_MEASURED = {}


def machine_rates(device):
    """A profile dict (probe.PROFILE_KEYS; missing keys fall back to plan.DEFAULT_RATES)."""
    path = os.environ.get("OFFLOAD_MACHINE")
    if path:
        return load_profile(path)
    if device.type != "cuda":
        return dict(DEFAULT_RATES)
    key = str(device)
    if key not in _MEASURED:
        import torch
        with torch.cuda.device(device):
            h2d, d2h, both, tflops, free = gpu_rates(256 << 20, 8192)
        _MEASURED[key] = {"cpu_adam_gparams_s": adam_native_rate(32 << 20), "pcie_h2d_gb_s": h2d,
                          "pcie_d2h_gb_s": d2h, "pcie_gb_s": both, "gpu_tflops": tflops, "gpu_memory_bytes": free}
    return dict(_MEASURED[key])
