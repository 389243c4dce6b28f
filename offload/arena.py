"""Pinned host arena: CPU tensors carved from one native mapping under an exact byte budget.

The native core (csrc/arena.h, offload._native.Arena) owns the memory and does the bookkeeping by offset;
this module pins the whole mapping once with CUDA and hands out torch tensors that view it.

Note [tensor lifetime]: every tensor is ``torch.frombuffer`` over an ``ArenaRegion``, and torch keeps the
buffer object alive for as long as the tensor's storage lives; the region in turn holds the native mapping.
So a tensor stays valid after ``free()``, ``close()`` and the ``HostArena`` itself are gone: it never
dangles. After ``free(t)`` its bytes may be handed to a later allocation, so using ``t`` then aliases that
allocation (memory-safe, but a bug in the caller). After ``close()`` (or once the ``HostArena`` is garbage
collected) the memory is no longer pinned: keep the arena open while its tensors are copied to a GPU.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Optional, Sequence, Tuple, Union

import torch

from . import _native

__all__ = ["HostArena", "SlotPool", "PinningWarning"]

_ALIGN = 4096  # O_DIRECT and DMA want page-aligned buffers

RegisterFn = Callable[[int, int], int]
UnregisterFn = Callable[[int], int]


class PinningWarning(RuntimeWarning):
    """Registering the arena with CUDA failed; it is used unpinned (host<->GPU copies are slower and synchronous)."""


def _cuda_register_pair() -> Tuple[RegisterFn, UnregisterFn]:
    cudart = torch.cuda.cudart()

    def register(address: int, nbytes: int) -> int:
        # cudaHostRegisterDefault (0): the arena is only used from this process's current CUDA context.
        return int(cudart.cudaHostRegister(address, nbytes, 0))

    def unregister(address: int) -> int:
        return int(cudart.cudaHostUnregister(address))

    return register, unregister


class HostArena:
    """CPU memory for the engine's host tier, under an exact budget, pinned for fast async copies.

    Args:
        budget_bytes: bytes the arena may hand out, alignment rounding included (see ``bytes_in_use``).
        pin: register the whole mapping with CUDA (``cudaHostRegister``) once. ``None``: pin when
            ``torch.cuda.is_available()``. On failure (e.g. ``RLIMIT_MEMLOCK``, ``ulimit -l``) a
            ``PinningWarning`` is issued and the arena works unpinned; ``pinned`` says which. Pinning commits
            the budget rounded to whole pages (RSS grows to that); unpinned, pages are committed as they are touched.
        huge_pages: ask for transparent huge pages (``madvise``), which makes pinning and copies cheaper.
        register: ``(register(address, nbytes) -> error code, unregister(address) -> error code)`` used
            instead of CUDA's when pinning, 0 meaning success (tests inject a fake pair; not a tuning knob).

    Not thread-safe on the Python side (``tensor``/``free`` mutate a dict); the native arena and slot
    pools are. ``close()`` must come after the copies that read or write the arena have completed.
    """

    def __init__(self, budget_bytes: int, *, pin: Optional[bool] = None, huge_pages: bool = True,
                 register: Optional[Tuple[RegisterFn, UnregisterFn]] = None):
        self._arena = _native.Arena(int(budget_bytes), bool(huge_pages))
        self._sizes: dict[int, int] = {}  # offset -> nbytes of each live tensor allocation
        self._unregister: Optional[UnregisterFn] = None
        if pin is None:
            pin = torch.cuda.is_available()
        if pin:
            try:
                self._pin(register if register is not None else _cuda_register_pair())
            except BaseException:
                self._arena.close()
                raise

    def _pin(self, pair: Tuple[RegisterFn, UnregisterFn]) -> None:
        register, unregister = pair
        # The budget rounded up to whole 4 KiB pages, not the 2 MiB-rounded mapping: registration commits
        # every page it covers, and cpu_memory must hold exactly (allocations never reach beyond the budget).
        address, nbytes = self._arena.address, -(-self._arena.budget // 4096) * 4096
        err = int(register(address, nbytes))
        if err == 0:
            self._unregister = unregister
            return
        warnings.warn(f"offload: pinning the {nbytes}-byte host arena failed (cudaError {err}); continuing "
                      f"unpinned, so host<->GPU copies will be slower and synchronous. Raise the locked-memory "
                      f"limit (ulimit -l / RLIMIT_MEMLOCK) or lower cpu_memory.", PinningWarning, stacklevel=3)

    @property
    def pinned(self) -> bool:
        """Whether the mapping is registered with CUDA (False after ``close()``)."""
        return self._unregister is not None

    @property
    def budget(self) -> int:
        return self._arena.budget

    @property
    def capacity(self) -> int:
        """Mapped bytes: the budget rounded up to 2 MiB (pinning registers only the budget, in whole pages)."""
        return self._arena.capacity

    @property
    def bytes_in_use(self) -> int:
        """Bytes charged against the budget: live tensors and slot pools, each rounded up to 4 KiB."""
        return self._arena.in_use

    @property
    def largest_free(self) -> int:
        return self._arena.largest_free

    @property
    def native(self) -> "_native.Arena":
        """The native arena, for native consumers (the store registers it with io_uring)."""
        return self._arena

    def tensor(self, shape_or_numel: Union[int, Sequence[int], torch.Size], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous CPU tensor in the arena, 4 KiB aligned, uninitialised. Setup-time call: O(1) native
        work, but one dict entry per tensor, so allocate per group (one flat buffer), not per parameter.
        Raises ``ArenaExhaustedError`` when it does not fit."""
        shape = (int(shape_or_numel),) if isinstance(shape_or_numel, int) else tuple(int(s) for s in shape_or_numel)
        itemsize = dtype.itemsize
        nbytes = math.prod(shape) * itemsize
        offset = self._arena.alloc(nbytes, _ALIGN)
        try:
            # torch.frombuffer refuses an empty buffer: view one element's bytes, then take none of them.
            region = self._arena.region(offset, nbytes or itemsize)
            flat = torch.frombuffer(region, dtype=dtype)
            t = (flat if nbytes else flat[:0]).view(shape)
        except BaseException:
            self._arena.free(offset)
            raise
        self._sizes[offset] = nbytes
        return t

    def free(self, t: torch.Tensor) -> None:
        """Returns ``t``'s bytes to the arena (any view of a ``tensor()`` result will do). ValueError when
        ``t`` is not a live allocation of this arena. See Note [tensor lifetime] for ``t`` afterwards."""
        offset = t.untyped_storage().data_ptr() - self._address()
        if offset not in self._sizes:
            raise ValueError("HostArena.free: the tensor is not a live allocation of this arena "
                             "(already freed, or allocated elsewhere)")
        self._arena.free(offset)
        del self._sizes[offset]

    def _address(self) -> int:
        if self._arena.closed:
            raise ValueError("HostArena is closed")
        return self._arena.address

    def slots(self, slot_bytes: int, count: int) -> "SlotPool":
        """``count`` buffers of ``slot_bytes`` each, carved from the arena at once (ArenaExhaustedError if
        they do not fit), for bounded rings whose ``acquire`` blocks while all are in use."""
        return SlotPool(self, int(slot_bytes), int(count))

    def close(self) -> None:
        """Unpins, then releases the mapping (tensors still alive keep it mapped, unpinned). Idempotent."""
        unregister, self._unregister = self._unregister, None
        if unregister is not None and not self._arena.closed:
            err = int(unregister(self._arena.address))
            if err != 0:
                warnings.warn(f"offload: cudaHostUnregister of the host arena failed (cudaError {err})",
                              PinningWarning, stacklevel=2)
        self._sizes.clear()
        self._arena.close()

    def __enter__(self) -> "HostArena":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        # Unregister before the mapping can go away with the last tensor: pages unmapped while still
        # registered would stay locked by the driver.
        if getattr(self, "_arena", None) is not None:
            self.close()

    def __repr__(self) -> str:
        return (f"HostArena(budget={self.budget}, in_use={self._arena.in_use}, pinned={self.pinned}, "
                f"huge_pages={self._arena.huge_pages})")


class SlotPool:
    """Equal uint8 buffers from a HostArena for bounded rings (prefetch, I/O staging).

    The slot tensors are made once here, so ``acquire``/``release`` do no allocation per step.
    """

    def __init__(self, arena: HostArena, slot_bytes: int, count: int):
        self._arena = arena  # keeps the arena open (and pinned) while the pool is in use
        self._pool = _native.SlotPool(arena.native, slot_bytes, count)
        native = arena.native
        self._views = [torch.frombuffer(native.region(self._pool.offset(i), slot_bytes), dtype=torch.uint8)
                       for i in range(count)]

    def acquire(self, timeout_s: float = -1.0) -> Optional[Tuple[int, torch.Tensor]]:
        """``(index, uint8 view of slot_bytes)``; blocks with the GIL released while every slot is held.
        With ``timeout_s >= 0``, returns None when no slot came free in time."""
        i = self._pool.acquire(timeout_s)
        return None if i < 0 else (i, self._views[i])

    def release(self, index: int) -> None:
        """Gives a slot back, waking one waiter. ValueError unless ``index`` is held."""
        self._pool.release(index)

    def view(self, index: int) -> torch.Tensor:
        return self._views[index]

    @property
    def slot_bytes(self) -> int:
        return self._pool.slot_bytes

    @property
    def count(self) -> int:
        return self._pool.count

    @property
    def free_count(self) -> int:
        return self._pool.free_count
