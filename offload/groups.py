"""Splits a model into streaming units: the group, never the tensor, is what moves between tiers.

The repeated blocks (children of the largest ModuleList/Sequential of same-typed modules, and of any other
such list not nested in it, e.g. an encoder's and a decoder's) are units; the remaining parameters
(embeddings, heads, norms) are gathered by the modules that own them into units by size. Parameters shared
by several modules (an LM head tied to its embedding, layers shared across depth) exist once: the units
that hold them are merged, so a shared parameter has one home and autograd sums its gradient.

Each unit owns one flat buffer per tier, laid out here: trainable parameters first (their fp32 master and
AdamW moments cover exactly that prefix), frozen ones after; every parameter starts on a 64-element
boundary. The trainable prefix and the frozen rest are each padded to PAD_ELEMS times the number of shards
(ranks), so that every tier's I/O is a multiple of 4 KiB and each region splits into equal, aligned rank
slices (Note [shard layout] in shard.py). Frozen parameters start after the padded prefix: inside it, the
optimizer (which updates the prefix as one segment) would decay them.
"""
import enum
from dataclasses import dataclass, field

import torch
from torch import nn

PARAM_ALIGN = 64      # elements: a 128-byte (bf16) / 256-byte (fp32) boundary for vector loads
PAD_ELEMS = 2048      # elements: 4 KiB of bf16, the O_DIRECT unit of every disk we target
MIN_BLOCK_SHARE = 0.05  # a second block list must hold at least this share of the parameters


class UnitState(enum.Enum):
    RELEASED = "released"    # no compute-side storage
    FETCHING = "fetching"    # compute storage allocated, host->device copy in flight (event pending)
    READY = "ready"          # compute storage valid


@dataclass(eq=False)
class ParamSlot:
    """One parameter inside its unit's flat buffer (elements, not bytes)."""
    name: str
    param: nn.Parameter
    offset: int
    numel: int
    shape: torch.Size
    trainable: bool


@dataclass(eq=False)
class Unit:
    index: int
    name: str
    kind: str                     # "block" or "rest"
    sites: list                   # modules whose forward needs this unit's parameters
    slots: list                   # ParamSlot, trainable first
    numel: int = 0                # padded flat length
    numel_train: int = 0          # padded trainable prefix: the extent of master/m/v and of gradients
    state: UnitState = UnitState.RELEASED
    extra: dict = field(default_factory=dict)

    @property
    def trainable(self):
        return self.numel_train > 0

    def describe(self):
        n = sum(s.numel for s in self.slots)
        return f"{self.name} ({len(self.slots)} params, {n:,} elements)"


def _under(fqn, prefix):
    return prefix == "" or fqn == prefix or fqn.startswith(prefix + ".")


def find_block_lists(model):
    """FQNs of the containers whose children are the repeated blocks (largest first, none nested)."""
    total = sum(p.numel() for p in model.parameters()) or 1
    cands = []
    for fqn, mod in model.named_modules():
        if isinstance(mod, (nn.ModuleList, nn.Sequential)):
            kids = list(mod.children())
            if len(kids) >= 2 and len({type(k) for k in kids}) == 1:
                n = sum(p.numel() for p in mod.parameters())
                if n > 0:
                    cands.append((n, fqn))
    cands.sort(key=lambda c: -c[0])
    accepted = []
    for n, fqn in cands:
        if accepted and n < MIN_BLOCK_SHARE * total:
            break
        if any(_under(fqn, a) or _under(a, fqn) for a in accepted):
            continue
        accepted.append(fqn)
    return accepted


class _UnionFind:
    def __init__(self, n):
        self.parent = list(range(n))

    def find(self, i):
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a, b):
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[max(a, b)] = min(a, b)


def split_units(model, rest_unit_elems=None, shards=1):
    """Returns the model's units in module order. rest_unit_elems caps the size of a gathered rest unit
    (default: the largest block, or an eighth of the model when there are no blocks); shards: the number of
    ranks each unit's buffer is split over."""
    if not isinstance(shards, int) or shards < 1:
        raise ValueError(f"split_units: shards={shards!r} must be an integer >= 1")
    names = {}
    for name, p in model.named_parameters(remove_duplicate=True):
        names[p] = name
    if not names:
        raise ValueError("the model has no parameters: nothing to train")
    modules = dict(model.named_modules())
    block_lists = find_block_lists(model)
    block_fqns = [f"{bl}.{child}" if bl else child for bl in block_lists for child, _ in modules[bl].named_children()]

    # Atoms, in module order: each block, and each module outside the blocks that directly owns parameters.
    atoms = []  # (kind, [site modules], [params], fqn)
    block_set = set(block_fqns)
    for fqn, m in model.named_modules():
        if fqn in block_set:
            atoms.append(("block", [m], list(m.parameters()), fqn))
        elif not any(_under(fqn, b) for b in block_fqns):
            own = list(m.parameters(recurse=False))
            if own:
                atoms.append(("rest", [m], own, fqn))

    uf = _UnionFind(len(atoms))
    owner = {}
    for i, (_, _, params, _) in enumerate(atoms):
        for p in params:
            if p in owner:
                uf.union(owner[p], i)
            else:
                owner[p] = i
    merged = {}
    for i in range(len(atoms)):
        merged.setdefault(uf.find(i), []).append(i)

    groups = []  # (kind, sites, params, name, numel)
    for root in sorted(merged):
        members = merged[root]
        kind = "block" if any(atoms[i][0] == "block" for i in members) else "rest"
        sites, params, seen = [], [], set()
        for i in members:
            sites += atoms[i][1]
            for p in atoms[i][2]:
                if p not in seen:
                    seen.add(p)
                    params.append(p)
        name = atoms[members[0]][3] or "<root>"
        if len(members) > 1 and kind == "rest":
            name += f"+{len(members) - 1}"
        groups.append([kind, sites, params, name, sum(p.numel() for p in params)])

    largest_block = max((g[4] for g in groups if g[0] == "block"), default=0)
    total = sum(g[4] for g in groups)
    cap = rest_unit_elems or (largest_block or max(1, total // 8))
    # Gather consecutive small rest groups into units of about `cap` elements: fewer, larger transfers.
    gathered = []
    for g in groups:
        prev = gathered[-1] if gathered else None
        if (g[0] == "rest" and prev is not None and prev[0] == "rest" and prev[4] + g[4] <= cap):
            prev[1] = prev[1] + g[1]
            prev[2] = prev[2] + g[2]
            prev[3] = prev[3].split("+")[0] + f"+{len(prev[1]) - 1}"
            prev[4] += g[4]
        else:
            gathered.append(list(g))

    units = []
    for idx, (kind, sites, params, name, _) in enumerate(gathered):
        unit = Unit(index=idx, name=name, kind=kind, sites=sites, slots=[])
        _layout(unit, params, names, PAD_ELEMS * shards)
        units.append(unit)
    return units


def _pad(n, multiple):
    return -(-n // multiple) * multiple


def _layout(unit, params, names, pad):
    off = 0
    for trainable in (True, False):
        if not trainable:
            unit.numel_train = off = _pad(off, pad)
        for p in params:
            if p.requires_grad == trainable:
                unit.slots.append(ParamSlot(names[p], p, off, p.numel(), p.shape, trainable))
                off += _pad(p.numel(), PARAM_ALIGN)
    unit.numel = _pad(off, pad)
