"""The rates the engine plans with: a machine profile (`offload probe -o FILE`, named by OFFLOAD_MACHINE),
or, on a GPU, a quick measurement of the few rates placement depends on, made once per process.

On the CPU (tests, CI) nothing is measured: placement there does not depend on rates, and the planner's
defaults price the prediction.
"""
import os

from .plan import DEFAULT_RATES
from .probe import adam_native_rate, gpu_rates, load_profile, pcie_rates

PCIE_BYTES = 256 << 20      # per copy buffer, for a steady rate (two device buffers are live)
MATMUL_N = 8192             # 8192^3 matmuls run near a large GPU's peak (three n x n bf16 tensors are live)
MIN_ROOM = 8 << 20          # below this, device-side measurements would be noise: the planner's defaults serve

_MEASURED = {}


def _sizes(room):
    """Copy buffer bytes and matmul size that each fit in room device bytes (they are measured one after the other)."""
    nbytes = min(PCIE_BYTES, room // 2 >> 20 << 20)
    n = min(MATMUL_N, int((room / 6) ** 0.5) // 256 * 256)
    return nbytes, n


def machine_rates(device, room=None):
    """A profile dict (probe.PROFILE_KEYS; missing keys fall back to plan.DEFAULT_RATES). room: the device
    bytes the measurement may take (the caller's budget), so that measuring never takes more than a run may."""
    path = os.environ.get("OFFLOAD_MACHINE")
    if path:
        return load_profile(path)
    if device.type != "cuda" or (room is not None and room < MIN_ROOM):
        return dict(DEFAULT_RATES)
    nbytes, n = _sizes(room if room is not None else 1 << 62)
    key = (str(device), nbytes, n)
    if key not in _MEASURED:
        import torch
        with torch.cuda.device(device):
            h2d, d2h, both, tflops, free = gpu_rates(nbytes, n)
        _MEASURED[key] = {"cpu_adam_gparams_s": adam_native_rate(32 << 20), "pcie_h2d_gb_s": h2d,
                          "pcie_d2h_gb_s": d2h, "pcie_gb_s": both, "gpu_tflops": tflops, "gpu_memory_bytes": free}
    return dict(_MEASURED[key])


def known_rates(device):
    """The machine profile, else what this process measured on device, else None; measures nothing."""
    path = os.environ.get("OFFLOAD_MACHINE")
    if path:
        return load_profile(path)
    return next((dict(r) for (d, _, _), r in _MEASURED.items() if d == str(device)), None)


def cpu_adam_rate(device):
    """CPU AdamW elements per second: known, else measured now (host memory only)."""
    known = known_rates(device) or {}
    return (known.get("cpu_adam_gparams_s") or adam_native_rate(32 << 20)) * 1e9


def device_to_host_rate(device, room):
    """Pinned device->host bytes per second: from the profile or an earlier measurement of this process when
    there is one, else a copy measured now in at most room device bytes (None when room is too small)."""
    known = known_rates(device)
    if known and known.get("pcie_d2h_gb_s"):
        return known["pcie_d2h_gb_s"] * 1e9
    if room < MIN_ROOM:
        return None
    import torch
    with torch.cuda.device(device):
        rate = pcie_rates(_sizes(room)[0])[1] * 1e9
    torch.cuda.empty_cache()
    return rate
