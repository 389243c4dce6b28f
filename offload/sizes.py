"""Byte sizes as users write them ("24GiB", "512MiB", "1.5GB", 1 << 30) and as we print them."""
import re

from .errors import ConfigError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(value, name="size"):
    """int bytes or a string like "24GiB"; None stays None. Raises ConfigError naming the argument."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"{name}={value!r}: expected bytes (int) or a string like '24GiB'")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ConfigError(f"{name}={value!r}: must not be negative")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"{name}={value!r}: expected bytes or a size like '24GiB', '512MiB', '1.5GB'")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def fmt_bytes(n):
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


def pinned_bytes(n):
    """What n bytes take in pinned host memory from torch's pinned allocator, which rounds every request up to
    a power of two."""
    return 1 << max(n - 1, 0).bit_length() if n else 0
