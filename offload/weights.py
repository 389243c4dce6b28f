"""Where a model's initial weights come from when it was built on the meta device: a Hugging Face folder's
safetensors shards (`Folder`) or seeded random values (`RandomInit`, for presets). Either way they are
materialised straight into each unit's tiers, never into a whole-model copy in memory.

Note [meta loading]: the folder's shard headers are read first (names, dtypes, shapes: a few KiB each), so a
parameter with no tensor or a tensor of the wrong shape is refused before anything is allocated. Then the
shards are opened one at a time, in order; each tensor is copied into an fp32 buffer of the unit that owns
it, and a unit is written to its tiers (tiers.load_initial) as soon as its last tensor has arrived, and its
buffer dropped. Host memory beyond the engine's budgets is therefore one mapped shard plus the units still
being assembled: with shards written in module order (as save_pretrained writes them) that is the unit a
shard boundary splits, a few per cent of the model, never all of it.

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

# safetensors dtype names -> torch dtypes (the ones a weight can have)
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
MAX_HEADER = 100 << 20   # safetensors' own limit on a header's size
PEFT_PREFIX = "base_model.model."


class WeightsError(ConfigError):
    """A weights folder is missing, unreadable or does not match the model; the message names what and where."""


def read_header(path):
    """{key: (dtype name, shape)} of one safetensors file, from its header alone (no tensor data is read)."""
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
        return {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items()}
    except (KeyError, TypeError):
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
        self.keys = {}   # key -> (file, dtype name, shape)
        for fname in files:
            fpath = os.path.join(self.path, fname)
            if not os.path.isfile(fpath):
                raise WeightsError(f"weights {self.path}: shard {fname} named by the index is missing")
            for k, (dt, shape) in read_header(fpath).items():
                self.keys[k] = (fname, dt, shape)

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
            _, dt, shape = self.keys[key]
            if shape != tuple(p.shape) or dt not in _DTYPES:
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
    """A checked weight source for offload.engine(weights=...): a folder path or a RandomInit."""
    if isinstance(weights, RandomInit):
        return weights
    if isinstance(weights, (str, os.PathLike)):
        return Folder(weights)
    raise ConfigError(f"weights={weights!r}: pass a Hugging Face model folder (safetensors shards) or an "
                      f"offload.weights.RandomInit")


def materialise_buffers(module, source):
    """Gives every meta-device buffer real values (CPU): from the folder when it holds them (persistent
    buffers), else from the model's Hugging Face initialiser. WeightsError naming those neither can give."""
    from safetensors import safe_open
    owners = [(fqn, m, n) for fqn, m in module.named_modules() for n, b in m._buffers.items()
              if b is not None and b.is_meta]
    left = []
    for fqn, m, n in owners:
        name = f"{fqn}.{n}" if fqn else n
        key = next((k for k in checkpoint_keys(name) if isinstance(source, Folder) and k in source.keys), None)
        if key is not None:
            with safe_open(os.path.join(source.path, source.keys[key][0]), framework="pt") as f:
                m._buffers[n] = f.get_tensor(key).to(m._buffers[n].dtype)
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


def _start(u, skip=()):
    """The unit's fp32 flat with the values of every non-meta parameter not in `skip` (padding zero)."""
    values = torch.zeros(u.numel, dtype=torch.float32)
    with torch.no_grad():
        for s in u.slots:
            if not s.param.is_meta and s.param not in skip:
                values[s.offset:s.offset + s.numel].copy_(s.param.detach().reshape(-1))
    return values


def _load_folder(units, tiers, module, folder):
    from safetensors import safe_open
    found = folder.match(module, [s.param for u in units for s in u.slots])
    by_file = {}        # shard -> [(unit, slot, key)]
    remaining = {}
    for u in units:
        mine = [s for s in u.slots if s.param in found]
        remaining[u.index] = len(mine)
        for s in mine:
            by_file.setdefault(folder.keys[found[s.param]][0], []).append((u, s, found[s.param]))
        if not mine:
            tiers.load_initial(u, _start(u))
    building = {}
    for fname in folder.files:
        entries = by_file.get(fname)
        if not entries:
            continue
        with safe_open(os.path.join(folder.path, fname), framework="pt") as f:
            for u, s, key in entries:
                if u.index not in building:
                    building[u.index] = _start(u, skip=found)
                values = building[u.index]
                values[s.offset:s.offset + s.numel].copy_(f.get_tensor(key).reshape(-1))
                remaining[u.index] -= 1
                if remaining[u.index] == 0:
                    tiers.load_initial(u, building.pop(u.index))


def _load_random(units, tiers, module, init):
    aliases = _aliases(module)
    owner = {p: m for m in module.modules() for p in m.parameters(recurse=False)}
    for u in units:
        values = _start(u)
        for s in u.slots:
            if s.param.is_meta:
                values[s.offset:s.offset + s.numel] = init.values(aliases[s.param][0], s.param, owner[s.param])
        tiers.load_initial(u, values)
