"""Opens the native NVMe swap store (csrc/store.h) and says, once, when it runs slower than asked.

The store itself is native: objects striped over directories, O_DIRECT where the filesystem takes it,
io_uring or a thread-pool backend, tickets waited with the GIL released. This module only normalises paths,
turns silent fallbacks into warnings and views tensors as bytes.
"""
import os
import warnings

from . import _native


def open_store(paths, **kw):
    """Returns an open ``_native.Store`` over ``paths`` (one directory or a list; ``~`` is expanded).

    Keywords are the Store's: ``queue_depth``, ``backend`` ("auto" | "io_uring" | "threadpool"), ``direct``
    ("auto" | "on" | "off"), ``stripe_bytes``, ``threads``, ``trace``. Warns once per path that fell back to
    buffered I/O, and once when the extension was built without liburing. Raises StoreIOError naming a path
    that is missing, not a directory or not writable.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [os.path.abspath(os.path.expanduser(os.fspath(p))) for p in paths]
    store = _native.Store(paths, **kw)
    if kw.get("direct", "auto") != "off":
        for path, direct in zip(paths, store.direct):
            if not direct:
                warnings.warn(f"{path}: filesystem refuses O_DIRECT (tmpfs?): using buffered I/O", stacklevel=2)
    if kw.get("backend", "auto") == "auto" and store.backend != "io_uring":
        if not _native.HAVE_URING:
            warnings.warn("built without liburing: the store uses its thread-pool backend "
                          "(install liburing-dev and rebuild for io_uring)", stacklevel=2)
        else:
            warnings.warn("io_uring ring setup failed (kernel.io_uring_disabled? seccomp?): the store uses its "
                          "thread-pool backend", stacklevel=2)
    return store


def as_buffer(tensor):
    """A writable uint8 numpy view of a contiguous CPU tensor's bytes (any dtype); no copy."""
    import torch

    if tensor.device.type != "cpu":
        raise ValueError(f"as_buffer: tensor is on {tensor.device}; the store reads and writes CPU memory")
    if not tensor.is_contiguous():
        raise ValueError("as_buffer: tensor is not contiguous; pass a contiguous tensor (a .contiguous() copy "
                         "would not alias the caller's storage)")
    return tensor.detach().reshape(-1).view(torch.uint8).numpy()
