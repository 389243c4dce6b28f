"""offload: fine-tune models far larger than GPU memory by streaming them across GPU, pinned CPU memory and NVMe."""
from .errors import ArenaExhaustedError, BudgetError, ConfigError, DeviceMemoryError, DistError, StoreIOError
from .optim import AdamW
from .plan import Plan
from .engine import Engine, engine

__version__ = "0.1.0"
__all__ = ["engine", "Engine", "AdamW", "Plan", "native_info", "BudgetError", "ConfigError", "StoreIOError",
           "ArenaExhaustedError", "DeviceMemoryError", "DistError"]


def native_info(paths=()):
    """The native core's build and runtime facts: store backend, SIMD level, O_DIRECT support per path."""
    from . import _native
    info = {"io_uring": bool(_native.HAVE_URING)}
    if hasattr(_native, "store_backends"):
        info["store_backends"] = list(_native.store_backends())
        info["backend"] = "io_uring" if "io_uring" in info["store_backends"] else "threadpool"
    if hasattr(_native, "simd_level"):
        info["simd"] = _native.simd_level()
    if paths and hasattr(_native, "probe_direct"):
        info["direct"] = {p: dict(_native.probe_direct(p)) for p in ([paths] if isinstance(paths, str) else paths)}
    return info
