"""Exception types. Budget and input problems are ValueError subclasses raised before any work starts;
I/O failures are OSError subclasses carrying the path, offset, length and errno (see csrc/common.h)."""
import errno as _errno

import torch


class StoreIOError(OSError):
    """An I/O operation of the swap store failed after retries (short transfers, EAGAIN, EINTR are retried)."""

    def __init__(self, err, strerror, path, offset=0, length=0, op="io"):
        super().__init__(err, strerror, path)
        self.offset = int(offset)
        self.length = int(length)
        self.op = op

    def __str__(self):
        name = _errno.errorcode.get(self.errno, str(self.errno))
        return (f"{self.op} failed on {self.filename} at offset {self.offset} length {self.length}: "
                f"[{name}] {self.strerror}")

    def __reduce__(self):
        return (type(self), (self.errno, self.strerror, self.filename, self.offset, self.length, self.op))


class ArenaExhaustedError(MemoryError):
    """The pinned host arena cannot satisfy an allocation within its byte budget."""

    def __init__(self, requested, budget, in_use):
        self.requested, self.budget, self.in_use = int(requested), int(budget), int(in_use)
        super().__init__(f"host arena exhausted: requested {self.requested} bytes with {self.in_use} of "
                         f"{self.budget} bytes in use; raise cpu_memory or lower the prefetch depth")


class BudgetError(ValueError):
    """A memory budget cannot hold what the plan needs; the message says by how much and what to change."""


class ConfigError(ValueError):
    """An argument to offload.engine() or the CLI is invalid; the message names it and the fix."""


class DeviceMemoryError(torch.OutOfMemoryError):
    """The compute device ran out of memory while the engine's planned bytes were within gpu_memory (the
    activations of a batch, or other processes, took the rest). A torch.OutOfMemoryError, so existing
    handlers still catch it; the message gives the budget, the plan's figures and the device's, and what to
    change. The step it interrupted is lost: close() (or load a checkpoint into a new engine)."""


class DistError(RuntimeError):
    """A collective across the ranks of a torch.distributed group failed: a peer process exited, or did not
    answer within the process group's timeout (shard.py, Note [dead peer])."""
