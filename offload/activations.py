"""Saved-tensor policy per block unit: what autograd keeps between a block's forward and its backward.

- "keep": saved tensors stay where autograd put them (the compute device).
- "recompute": only the block's inputs are kept; the first time backward needs a saved tensor, the block's
  forward is re-run (same RNG state, same autocast state) under a capturing hook, and the tensors it saves
  replace the dropped ones in order. Parameters are resident then: the block's backward has acquired them.
- "swap": every saved tensor that is not a parameter goes to pinned host memory on the device->host
  stream and comes back when backward asks for it.
- "auto": per block, keep while the projected activation memory of the remaining blocks fits the device
  budget, recompute from there on; the decision made in the first step is kept for later steps.

The policy runs through torch.autograd.graph.saved_tensors_hooks entered in the block's forward pre-hook
and left in its forward hook, so the model's code is untouched and no model gradient-checkpointing flag is
needed.
"""
import contextlib

import torch
from torch.utils._pytree import tree_map

from ._native import trace_kind

POLICIES = ("keep", "recompute", "swap", "auto")


def _capture_autocast(device_type):
    if device_type == "cuda" and torch.is_autocast_enabled("cuda"):
        return ("cuda", torch.get_autocast_dtype("cuda"))
    if torch.is_autocast_enabled("cpu"):
        return ("cpu", torch.get_autocast_dtype("cpu"))
    return None


class RecomputeScope:
    """The saved-tensor hooks of one block call under "recompute"."""

    def __init__(self, module, args, kwargs, device, on_recompute):
        self.module, self.args, self.kwargs = module, args, kwargs
        self.device = device
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.autocast = _capture_autocast(device.type)
        self.count = 0
        self.saved = None
        self.on_recompute = on_recompute   # context manager factory: marks the engine as recomputing
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def pack(self, t):
        i = self.count
        self.count += 1
        return i

    def unpack(self, i):
        if self.saved is None:
            self._recompute()
        t = self.saved[i]
        self.saved[i] = None   # each saved tensor is unpacked once; free it as soon as it is handed over
        return t

    def _recompute(self):
        saved = []

        def capture(t):
            # Keep a detached alias, and give the recomputed graph nothing: it is never differentiated, and
            # it saves some of its ops' own outputs; holding those (with their grad_fn) in it would make a
            # reference cycle through autograd's C++ graph that Python's GC cannot break, leaking every
            # recomputed block's activations each step.
            saved.append(t.detach())
            return None

        def detach(x):
            return x.detach().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x

        args, kwargs = tree_map(detach, self.args), tree_map(detach, self.kwargs)
        devices = [self.device] if self.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu_rng)
            if self.cuda_rng is not None:
                torch.cuda.set_rng_state(self.cuda_rng, self.device)
            autocast = (torch.autocast(self.autocast[0], dtype=self.autocast[1]) if self.autocast
                        else contextlib.nullcontext())
            with torch.enable_grad(), autocast, self.on_recompute(), \
                    torch.autograd.graph.saved_tensors_hooks(capture, _never_unpacked):
                self.module(*args, **kwargs)
        if len(saved) != self.count:
            raise RuntimeError(f"recompute of {type(self.module).__name__} saved {len(saved)} tensors where the "
                               f"forward saved {self.count}: its forward is not deterministic in structure; "
                               f"use activations='keep' or 'swap' for it")
        self.saved = saved
        self.args = self.kwargs = None


def _never_unpacked(_):
    raise RuntimeError("offload: a recomputed block's own graph was differentiated; it is only a source of "
                       "saved tensors")


class SwapScope:
    """The saved-tensor hooks of one block call under "swap"."""

    def __init__(self, device, d2h_stream, param_storages, trace=None, unit=None):
        self.device, self.stream = device, d2h_stream
        self.param_storages = param_storages
        self.trace, self.unit = trace, unit   # a profiler.Profiler: copies are timed on their streams
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def pack(self, t):
        if t.device.type != "cuda" or t.untyped_storage().data_ptr() in self.param_storages:
            return (None, t, None)
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        ev = torch.cuda.Event()
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            span = self.trace.begin_work(trace_kind.ACT_SWAP_OUT, self.unit, self.stream) if self.trace else None
            host.copy_(t, non_blocking=True)
            if span is not None:
                self.trace.end_work(span, trace_kind.ACT_SWAP_OUT, self.unit, host.nbytes, self.stream)
            ev.record(self.stream)
        t.record_stream(self.stream)
        return (host, None, ev)

    def unpack(self, packed):
        host, t, ev = packed
        if host is None:
            return t
        ev.synchronize()
        span = self.trace.begin_work(trace_kind.ACT_SWAP_IN, self.unit) if self.trace else None
        t = host.to(self.device, non_blocking=True)
        if span is not None:
            self.trace.end_work(span, trace_kind.ACT_SWAP_IN, self.unit, host.nbytes)
        return t
