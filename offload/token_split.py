"""The token-wise split policy (activations=a, a float in (0, 1)), after MEMO: for each saved tensor of a
block call that has a token dimension, the first a of the tokens go to host memory and the rest are dropped
and recomputed in backward; per-token layers recompute only the dropped rows.

Note [token split]: in backward the block's forward is re-run (same RNG and autocast state, as "recompute")
with forward hooks on its per-token leaf modules (Linear, norms, activation modules: leaf_modules()). A leaf
call at or after position `c` in call order runs on the dropped rows only, and hands on an output of full
length whose swapped rows are NaN. Rows of the layers after the last token-mixing op (attention) depend only
on their own row, so the NaN rows stay in the swapped rows of every later saved tensor; those rows are then
filled from the host copy. Leaves before `c` (the projections that feed attention, whose keys and values
must be full length) run whole.

`c` and, per saved tensor, what is kept of it are found per block call signature by calibration, the first
time a block's backward runs: that forward stored every saved tensor whole (the truth), and backward re-runs
the block with several `c` (a binary search: fewer partial leaves never spread NaN further) and classifies
each recomputed tensor against the truth:
- "full": recomputed equal to the truth (NaN-free): dropped in forward, taken from the recompute;
- "splice": its token rows from the dropped part on are recomputed correctly (NaN-free, equal to the truth),
  its first rows are NaN or it was computed on the dropped rows only: the first rows are swapped;
- "whole": anything else (a value that mixes swapped rows): swapped whole.
The smallest `c` whose classification stores nothing whole that full recompute would not is chosen. Every
tensor backward receives is thus either the forward's own value (host copy) or a recomputed value that
calibration found equal to it, so the gradients are those of keeping everything, within the rounding of
computing a matmul on fewer rows. NaN marks the swapped rows because every arithmetic op carries it on: a
layer that mixes tokens would spread it into dropped rows, which calibration sees.

Compute saved: the leaves from `c` on run on (1 - a) of the rows; everything before `c`, attention among it,
is recomputed whole. In a pre-norm transformer block `c` falls after the query/key/value projections: the
output projection and the MLP (about three quarters of the block's matmul FLOPs) are recomputed on the
dropped rows only.
"""
import torch
from torch import nn

from .activations import Replay, structure_error

_PER_TOKEN = (nn.Linear, nn.LayerNorm, nn.GELU, nn.SiLU, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Mish, nn.LeakyReLU,
              nn.Identity)
if hasattr(nn, "RMSNorm"):
    _PER_TOKEN = _PER_TOKEN + (nn.RMSNorm,)


def _per_token(m):
    """Leaf modules whose output row t depends only on input row t and that draw no random numbers (the
    RNG stream of a recompute must equal the forward's, so nothing here may consume it)."""
    if any(True for _ in m.children()):
        return False
    if isinstance(m, _PER_TOKEN):
        return True
    name = type(m).__name__
    # Norm and activation classes of model libraries (LlamaRMSNorm, T5LayerNorm, GELUActivation, ...).
    return name.endswith(("RMSNorm", "LayerNorm")) or type(m).__module__ == "transformers.activations"


def leaf_modules(module):
    return [m for m in module.modules() if _per_token(m)]


def geometry(args, kwargs):
    """(batch, tokens) of a block call: the first floating tensor input with at least two dims is
    [batch, tokens, ...]; None when there is none."""
    for x in list(args) + list(kwargs.values()):
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() >= 2:
            return int(x.shape[0]), int(x.shape[1])
    return None


def _signature(args, kwargs):
    return tuple((tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__
                 for x in list(args) + list(kwargs.values()))


def token_axis(shape, B, T):
    """(dim, flat) of the token axis of a tensor of `shape`: flat means dim holds batch*tokens rows."""
    if len(shape) >= 2 and shape[0] == B and shape[1] == T:
        return (1, False)
    if B > 1 and len(shape) >= 1 and shape[0] == B * T:
        return (0, True)
    for d in range(1, len(shape)):
        if shape[d] == T:
            return (d, False)
    if len(shape) >= 1 and shape[0] == T:
        return (0, False)
    return None


def _rows(x, axis, B, start, length):
    """The token rows [start, start + length) of x along axis (dim, flat), as a view where possible."""
    d, flat = axis
    if flat:
        x = x.unflatten(d, (B, -1))
        d += 1
    return x.narrow(d, start, length)


class _LeafSplicer:
    """Forward hooks on a block's per-token leaves for one recompute: leaf calls from position c on run on
    the dropped rows only and return full-length outputs whose swapped rows are NaN (Note [token split])."""

    def __init__(self, leaves, c, B, T, k):
        self.leaves, self.c, self.B, self.T, self.k = leaves, c, B, T, k
        self.calls = 0
        self.pending = []
        self.handles = []

    def __enter__(self):
        for m in self.leaves:
            self.handles.append(m.register_forward_pre_hook(self._pre))
            self.handles.append(m.register_forward_hook(self._post))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return False

    def _pre(self, module, args):
        i = self.calls
        self.calls += 1
        x = args[0] if args else None
        B, T, k = self.B, self.T, self.k
        how = None
        if i >= self.c and isinstance(x, torch.Tensor) and x.is_floating_point():
            if x.dim() >= 2 and x.shape[0] == B and x.shape[1] == T:
                # contiguous: a strided input can take another matmul path, which saves other tensors
                how, x = "bt", x[:, k:].contiguous()
            elif B > 1 and x.dim() >= 1 and x.shape[0] == B * T:
                how, x = "flat", x.reshape(B, T, *x.shape[1:])[:, k:].flatten(0, 1)
        self.pending.append(how)
        return None if how is None else (x,) + tuple(args[1:])

    def _post(self, module, args, out):
        how = self.pending.pop()
        if how is None:
            return None
        B, k = self.B, self.k
        o = out if how == "bt" else out.unflatten(0, (B, -1))
        fill = o.new_full((B, k) + tuple(o.shape[2:]), float("nan"))
        full = torch.cat([fill, o], 1)
        return full if how == "bt" else full.flatten(0, 1)


def _close(r, t):
    """A recomputed value equals the truth: exactly for non-floating tensors; within a relative norm for
    floating ones (a matmul on fewer rows may round differently; a wrong row or a NaN is far off)."""
    if r.shape != t.shape or r.dtype != t.dtype:
        return False
    if not t.is_floating_point():
        return torch.equal(r, t)
    if torch.isnan(r).any():
        return False
    tol = 1e-4 if t.element_size() >= 4 else 3e-2
    diff = (r.float() - t.float()).norm()
    return bool(diff <= tol * t.float().norm() + 1e-30)


class Layout:
    """Calibrated split of one block call signature: the first partial leaf call `c`, and per saved tensor
    its kind ("full" | "splice" | "whole"), token axis, whether the recompute gives only the dropped rows,
    and its forward shape."""

    def __init__(self, c, kinds, shapes):
        self.c, self.kinds, self.shapes = c, kinds, shapes

    @property
    def stored(self):
        return sum(1 for k in self.kinds if k[0] != "full")


def _classify(rec, truth, B, T, k):
    kinds = []
    for r, t in zip(rec, truth):
        if r.shape == t.shape:
            if _close(r, t):
                kinds.append(("full",))
                continue
            axis = token_axis(tuple(t.shape), B, T)
            if axis is not None and t.is_floating_point():
                n = t.shape[axis[0]] // (B if axis[1] else 1)
                if n == T and _close(_rows(r, axis, B, k, T - k), _rows(t, axis, B, k, T - k)):
                    kinds.append(("splice", axis, False))
                    continue
            kinds.append(("whole",))
            continue
        diff = [d for d in range(t.dim()) if r.dim() == t.dim() and r.shape[d] != t.shape[d]]
        if len(diff) == 1:
            d = diff[0]
            flat = B > 1 and t.shape[d] == B * T and r.shape[d] == B * (T - k)
            if (t.shape[d] == T and r.shape[d] == T - k) or flat:
                axis = (d, flat)
                if _close(r, _rows(t, axis, B, k, T - k).reshape(r.shape)):
                    kinds.append(("splice", axis, True))
                    continue
        kinds.append(("whole",))
    return kinds


def calibrate(replay, leaves, truth, B, T, k):
    """Layout for a block call whose saved tensors `truth` were stored whole (Note [token split])."""
    def attempt(c):
        splicer = _LeafSplicer(leaves, c, B, T, k)
        try:
            rec = replay.run(lambda: splicer)
        except Exception:   # a block that cannot run on partial rows from this c on: not a candidate
            if c >= (1 << 30):
                raise
            return None, splicer.calls
        if len(rec) != len(truth):
            return None, splicer.calls
        return _classify(rec, truth, B, T, k), splicer.calls

    base, n = attempt(1 << 30)           # whole recompute: what it cannot reproduce is stored whole anyway
    if base is None:
        raise structure_error(replay.module, -1, len(truth))
    allowed = sum(1 for x in base if x[0] == "whole")
    best = (n, base)
    lo, hi = 0, n                        # the smallest c in [lo, hi] that stores no more whole than `base`
    while lo < hi:
        mid = (lo + hi) // 2
        kinds, _ = attempt(mid)
        if kinds is not None and sum(1 for x in kinds if x[0] == "whole") <= allowed:
            best, hi = (mid, kinds), mid
        else:
            lo = mid + 1
    return Layout(best[0], best[1], [tuple(t.shape) for t in truth])


class TokenSplitScope:
    """The saved-tensor hooks of one block call under the token-wise split (Note [token split])."""

    def __init__(self, module, args, kwargs, device, fraction, stash, layouts, param_storages, on_recompute,
                 prev=None, host_rng=None):
        self.replay = Replay(module, args, kwargs, device, on_recompute, host_rng)
        self.stash, self.param_storages, self.prev = stash, param_storages, prev
        self.device = device
        g = geometry(args, kwargs)
        self.B, self.T = g if g is not None else (1, 1)
        self.k = max(1, min(self.T - 1, round(fraction * self.T))) if self.T > 1 else 0
        self.key = (id(module), self.k, _signature(args, kwargs))
        self.layouts = layouts
        self.layout = layouts.get(self.key)
        self.entries = []
        self.saved = None
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def _is_param(self, t):
        return t.device.type == self.device.type and t.untyped_storage().data_ptr() in self.param_storages

    def pack(self, t):
        i = len(self.entries)
        lay = self.layout
        if lay is None:                                       # calibrating: store every tensor whole
            e = ("ref", t) if self._is_param(t) or self.k == 0 else ("host", self.stash.put(t))
        else:
            if i >= len(lay.kinds) or tuple(t.shape) != lay.shapes[i]:
                raise structure_error(self.replay.module, i + 1, len(lay.kinds))
            kind = lay.kinds[i]
            if kind[0] == "full":
                e = ("drop",)
            elif kind[0] == "whole":
                e = ("ref", t) if self._is_param(t) else ("host", self.stash.put(t))
            else:
                e = ("splice", self.stash.put(_rows(t, kind[1], self.B, 0, self.k)))
        self.entries.append(e)
        return i

    def unpack(self, i):
        if self.saved is None:
            self.saved = self._restore()
            self.replay.release()
            self.entries = None
        t = self.saved[i]
        self.saved[i] = None
        return t

    def _fetch(self, e):
        return e[1] if e[0] == "ref" else self.stash.get(e[1])

    def _restore(self):
        leaves = leaf_modules(self.replay.module)
        if self.layout is None:
            truth = [self._fetch(e) for e in self.entries]
            if self.k:
                self.layouts[self.key] = calibrate(self.replay, leaves, truth, self.B, self.T, self.k)
            return truth
        lay = self.layout
        rec = self.replay.run(lambda: _LeafSplicer(leaves, lay.c, self.B, self.T, self.k))
        if len(rec) != len(self.entries):
            raise structure_error(self.replay.module, len(rec), len(self.entries))
        out = []
        for r, e, kind, shape in zip(rec, self.entries, lay.kinds, lay.shapes):
            if kind[0] == "full":
                out.append(r)
            elif kind[0] == "whole":
                out.append(self._fetch(e))
            else:
                out.append(self._splice(r, self.stash.get(e[1]), kind, shape))
        return out

    def _splice(self, r, head, kind, shape):
        """The forward's tensor of `shape` from its swapped first rows `head` and the recomputed rest `r`."""
        _, axis, reduced = kind
        B, T, k = self.B, self.T, self.k
        with torch.no_grad():
            full = torch.empty(shape, dtype=r.dtype, device=r.device) if reduced else r
            _rows(full, axis, B, 0, k).copy_(head)
            if reduced:
                _rows(full, axis, B, k, T - k).copy_(r.reshape(_rows(full, axis, B, k, T - k).shape))
        return full

    def exit(self):
        self.replay.forward_done()
        self.stash.sealed()

    def prefetch(self):
        self.stash.prefetch()
