"""Where a model's initial weights come from when it was built on the meta device: a Hugging Face folder's
safetensors shards (`Folder`) or seeded random values (`RandomInit`, for presets). Either way they are
materialised straight into each unit's tiers, never into a whole-model copy in memory.

Note [meta loading]: the folder's shard headers are read first (names, dtypes, shapes, byte ranges: a few
KiB each), so a parameter with no tensor or a tensor of the wrong shape is refused before anything is
allocated. Then the shards are read one at a time, in order, with plain reads (no memory map): each
tensor's bytes go straight into the fp32 buffer of the unit that owns it (through one reused staging
buffer when the file holds another dtype), and a unit is written to its tiers (tiers.load_initial) as soon
as its last tensor has arrived. Assembly buffers are pooled: with shards written in module order (as
save_pretrained writes them) two are in use at most, the unit a shard boundary splits and the next. Host
memory beyond the engine's budgets is those buffers plus the staging of the largest tensor, never the model.

Parameters that are not on the meta device keep their values unless the folder has a tensor for them; that
is how LoRA adapters created beside a meta-device base model keep their initialisation. Non-persistent
buffers (rotary tables) are not in checkpoints: a meta one is recomputed by the model's own Hugging Face
initialiser (`_init_weights`), the one from_pretrained uses.
"""
import json
import os
import struct
import zlib
from dataclasses import dataclass

import torch

from .errors import ConfigError
from .store import as_buffer

# safetensors dtype names -> torch dtypes (the ones a weight can have)
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
MAX_HEADER = 100 << 20   # safetensors' own limit on a header's size
PEFT_PREFIX = "base_model.model."


class WeightsError(ConfigError):
    """A weights folder is missing, unreadable or does not match the model; the message names what and where."""


def read_header(path):
    """{key: (dtype name, shape, start, end)} of one safetensors file (byte range in the file), from its
    header alone (no tensor data is read)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
            if not 0 < n <= MAX_HEADER:
                raise WeightsError(f"{path}: not a safetensors file (bad header length)")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:     # ValueError: bad JSON or UTF-8
        raise WeightsError(f"{path}: unreadable safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: not a safetensors file (header is not a table)")
    header.pop("__metadata__", None)
    try:
        return {k: (v["dtype"], tuple(v["shape"]), 8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])
                for k, v in header.items()}
    except (KeyError, TypeError, IndexError):
        raise WeightsError(f"{path}: malformed safetensors header") from None


def checkpoint_keys(name):
    """Keys a parameter may be stored under: its own name and, when peft wraps the model, the base model's
    name (peft adds a "base_model.model." prefix and moves a wrapped layer's weight under "base_layer")."""
    keys = [name]
    if name.startswith(PEFT_PREFIX):
        name = name[len(PEFT_PREFIX):]
        keys.append(name)
    if ".base_layer." in name:
        keys.append(name.replace(".base_layer.", "."))
    return keys


def _aliases(module):
    """parameter -> every name it has in the module (tied parameters have several)."""
    out = {}
    for n, p in module.named_parameters(remove_duplicate=False):
        out.setdefault(p, []).append(n)
    return out


class Folder:
    """A Hugging Face model folder's safetensors shards, indexed by their headers."""

    def __init__(self, path):
        self.path = os.path.abspath(os.fspath(path))
        if not os.path.isdir(self.path):
            raise WeightsError(f"weights {self.path}: not a directory")
        names = os.listdir(self.path)
        index = os.path.join(self.path, "model.safetensors.index.json")
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    files = sorted(set(json.load(f)["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise WeightsError(f"{index}: unreadable shard index ({e!r})") from None
        else:
            files = sorted(n for n in names if n.endswith(".safetensors") and not n.startswith("adapter_"))
        if not files:
            pickled = [n for n in names if n.endswith((".bin", ".pt", ".pth"))]
            raise WeightsError(f"weights {self.path}: no *.safetensors shards" + (
                f" (found {', '.join(pickled[:3])}: pickled weights are not loaded; convert them to safetensors)"
                if pickled else ""))
        self.files = files
        self.keys = {}   # key -> (file, dtype name, shape, start, end)
        for fname in files:
            fpath = os.path.join(self.path, fname)
            if not os.path.isfile(fpath):
                raise WeightsError(f"weights {self.path}: shard {fname} named by the index is missing")
            size = os.path.getsize(fpath)
            for k, (dt, shape, start, end) in read_header(fpath).items():
                if end > size:
                    raise WeightsError(f"{fpath}: truncated ({k} ends at byte {end}, the file has {size})")
                self.keys[k] = (fname, dt, shape, start, end)

    def match(self, module, params):
        """{param: key} for the params the folder holds; WeightsError naming every meta-device param without
        a tensor, and every tensor whose shape or dtype does not fit."""
        aliases = _aliases(module)
        found, missing, wrong = {}, [], []
        for p in params:
            names = aliases[p]
            key = next((k for n in names for k in checkpoint_keys(n) if k in self.keys), None)
            if key is None:
                if p.is_meta:
                    missing.append(names[0])
                continue
            _, dt, shape, start, end = self.keys[key]
            if shape != tuple(p.shape) or dt not in _DTYPES or end - start != p.numel() * _DTYPES[dt].itemsize:
                wrong.append(f"{key} is {dt}{list(shape)}, the model's {names[0]} {list(p.shape)}")
            found[p] = key
        if missing:
            some = ", ".join(sorted(self.keys)[:3])
            raise WeightsError(f"weights {self.path}: no tensor for {len(missing)} parameters of the model, e.g. "
                               f"{', '.join(missing[:3])} (the shards hold {len(self.keys)} tensors such as {some}): "
                               f"the folder holds another model or architecture")
        if wrong:
            raise WeightsError(f"weights {self.path}: {len(wrong)} tensors do not fit the model: {'; '.join(wrong[:3])}")
        return found


    def read_into(self, key, out, staging=None):
        """Reads tensor `key` into the contiguous CPU tensor `out` (same number of elements), converting its
        dtype through `staging` (a uint8 tensor, grown as needed; returned) when the file's differs."""
        fname, dt, _, start, end = self.keys[key]
        src = _DTYPES[dt]
        target = out if src == out.dtype else None
        if target is None:
            if staging is None or staging.numel() < end - start:
                staging = torch.empty(end - start, dtype=torch.uint8)
            target = staging[:end - start].view(src)
        path = os.path.join(self.path, fname)
        with open(path, "rb", buffering=0) as f:
            _read_exact(f, start, as_buffer(target), path)
        if target is not out:
            out.copy_(target)
        return staging


def _read_exact(f, offset, buf, path):
    view = memoryview(buf).cast("B")
    f.seek(offset)
    done = 0
    while done < len(view):           # a read may return less than asked: go on from where it stopped
        n = f.readinto(view[done:])
        if not n:
            raise WeightsError(f"{path}: truncated at byte {offset + done}")
        done += n


@dataclass(frozen=True)
class RandomInit:
    """Seeded random weights for the meta-device parameters of a model (presets: demos, CI, benchmarks):
    N(0, std) for matrices and embeddings, ones for the weights of norm layers, zeros for biases. Each
    parameter's values depend only on the seed and its name. A parameter draws at most `period` fresh
    values and repeats them to fill itself, so a 70B model is initialised at memory speed; a tiny model's
    parameters are all fresh draws."""
    seed: int = 0
    std: float = 0.02
    period: int = 1 << 22

    def values(self, name, param, owner):
        if name.endswith("bias") or (param.dim() == 1 and "Norm" not in type(owner).__name__):
            return torch.zeros(param.numel())
        if param.dim() == 1:
            return torch.ones(param.numel())
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        n = param.numel()
        draw = torch.randn(min(n, self.period), generator=g).mul_(self.std)
        return draw.repeat(-(-n // draw.numel()))[:n]


def open_source(weights, module):
    """A checked weight source for offload.engine(weights=...): a folder path (or an opened Folder) or a
    RandomInit."""
    if isinstance(weights, (RandomInit, Folder)):
        return weights
    if isinstance(weights, (str, os.PathLike)):
        return Folder(weights)
    raise ConfigError(f"weights={weights!r}: pass a Hugging Face model folder (safetensors shards) or an "
                      f"offload.weights.RandomInit")


def materialise_buffers(module, source):
    """Gives every meta-device buffer real values (CPU): from the folder when it holds them (persistent
    buffers), else from the model's Hugging Face initialiser. WeightsError naming those neither can give."""
    owners = [(fqn, m, n) for fqn, m in module.named_modules() for n, b in m._buffers.items()
              if b is not None and b.is_meta]
    left = []
    for fqn, m, n in owners:
        name = f"{fqn}.{n}" if fqn else n
        key = next((k for k in checkpoint_keys(name) if isinstance(source, Folder) and k in source.keys), None)
        if key is not None:
            _, dt, shape, _, _ = source.keys[key]
            if dt not in _DTYPES or shape != tuple(m._buffers[n].shape):
                raise WeightsError(f"weights {source.path}: buffer {key} is {dt}{list(shape)}, the model's "
                                   f"{list(m._buffers[n].shape)}")
            t = torch.empty(shape, dtype=_DTYPES[dt])
            source.read_into(key, t)
            m._buffers[n] = t.to(m._buffers[n].dtype)
            continue
        m._buffers[n] = torch.empty_like(m._buffers[n], device="cpu")
        left.append((name, m, n))
    init = _hf_initialiser(module)
    for m in {id(m): m for _, m, _ in left}.values():
        if init is not None:
            with torch.no_grad():
                init(m)
    unset = [name for name, m, n in left if init is None]
    if unset:
        raise WeightsError(f"buffers on the meta device with no value in the weights and no Hugging Face "
                           f"initialiser: {', '.join(unset[:3])}; build the model with real buffers")


def _hf_initialiser(module):
    """The `_init_weights` of the (possibly peft-wrapped) Hugging Face model, or None."""
    for m in module.modules():
        if hasattr(m, "_init_weights") and hasattr(m, "config"):
            return m._init_weights
    return None


def _unreal(param):
    """Swaps a meta-device parameter for an empty CPU one in place (same Python object, so the module,
    the unit's slot and tied aliases all keep it); tiers.bind_params then points it at its flat buffer."""
    if param.is_meta:
        torch.utils.swap_tensors(param, torch.nn.Parameter(torch.empty(0, dtype=param.dtype),
                                                           requires_grad=param.requires_grad))


def load_units(units, tiers, module, source):
    """Writes every unit's initial values into its tiers from `source` (Note [meta loading])."""
    if isinstance(source, Folder):
        _load_folder(units, tiers, module, source)
    else:
        _load_random(units, tiers, module, source)
    for u in units:
        for s in u.slots:
            _unreal(s.param)


def _start(u, skip=(), pool=None):
    """A buffer whose first u.numel elements are the unit's fp32 flat with the values of every non-meta
    parameter not in `skip` (padding zero); taken from `pool` (buffers handed back after earlier units) when
    one is large enough."""
    i = next((i for i, b in enumerate(pool or ()) if b.numel() >= u.numel), None)
    if i is not None:
        base = pool.pop(i)
        base[:u.numel].zero_()
    else:
        base = torch.zeros(u.numel, dtype=torch.float32)
    values = base[:u.numel]
    with torch.no_grad():
        for s in u.slots:
            if not s.param.is_meta and s.param not in skip:
                values[s.offset:s.offset + s.numel].copy_(s.param.detach().reshape(-1))
    return base


def _load_folder(units, tiers, module, folder):
    found = folder.match(module, [s.param for u in units for s in u.slots])
    by_file = {}        # shard -> [(unit, slot, key)] in file order
    remaining = {}
    for u in units:
        mine = [s for s in u.slots if s.param in found]
        remaining[u.index] = len(mine)
        for s in mine:
            by_file.setdefault(folder.keys[found[s.param]][0], []).append((u, s, found[s.param]))
        if not mine:
            tiers.load_initial(u, _start(u))
    pool, building, staging = [], {}, None
    for fname in folder.files:
        for u, s, key in sorted(by_file.get(fname, ()), key=lambda e: folder.keys[e[2]][3]):
            if u.index not in building:
                building[u.index] = _start(u, skip=found, pool=pool)
            base = building[u.index]
            staging = folder.read_into(key, base[s.offset:s.offset + s.numel], staging)
            remaining[u.index] -= 1
            if remaining[u.index] == 0:
                base = building.pop(u.index)
                tiers.load_initial(u, base[:u.numel])
                pool.append(base)


def _load_random(units, tiers, module, init):
    aliases = _aliases(module)
    owner = {p: m for m in module.modules() for p in m.parameters(recurse=False)}
    for u in units:
        values = _start(u)
        for s in u.slots:
            if s.param.is_meta:
                values[s.offset:s.offset + s.numel] = init.values(aliases[s.param][0], s.param, owner[s.param])
        tiers.load_initial(u, values)
