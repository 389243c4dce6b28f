"""offload: fine-tune models far larger than GPU memory by streaming them across GPU, pinned CPU memory and NVMe."""
from .errors import ArenaExhaustedError, BudgetError, ConfigError, StoreIOError

__version__ = "0.1.0"
