"""Checkpoints of every tier: safetensors shards (one per unit) plus a manifest written last.

Layout of a checkpoint directory: unit-00000.safetensors ... (per parameter: "<name>::param" in the compute
dtype, and for trainable ones "<name>::master", "<name>::exp_avg", "<name>::exp_avg_sq" in fp32 and
"<name>::step" int64), rng.safetensors, manifest.json (format, step counters, optimizer hyperparameters,
the shard list with sha256 of every file). Shards are keyed by parameter name, not by unit, so a checkpoint
loads into any tier layout. Saving streams unit by unit (never the whole model in RAM) into a temporary
directory, fsyncs, then renames it into place; an existing checkpoint stays valid until the new one is
complete (it is moved aside, replaced, then removed). Nothing on the load path unpickles.
"""
import hashlib
import json
import os
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "offload-checkpoint"
VERSION = 1


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_path(path, directory=False):
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(engine, directory):
    directory = os.path.abspath(os.fspath(directory))
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    engine.sync()
    tmp = f"{directory}.tmp-{os.getpid()}"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp, mode=0o700)
    shards = []
    for u in engine.units:
        compute, master, m, v = engine.tiers.read_unit(u)
        tensors = {}
        trainable_i = 0
        for s in u.slots:
            sl = slice(s.offset, s.offset + s.numel)
            tensors[f"{s.name}::param"] = compute[sl].view(s.shape).contiguous()
            if s.trainable:
                tensors[f"{s.name}::master"] = master[sl].view(s.shape).contiguous()
                tensors[f"{s.name}::exp_avg"] = m[sl].view(s.shape).contiguous()
                tensors[f"{s.name}::exp_avg_sq"] = v[sl].view(s.shape).contiguous()
                tensors[f"{s.name}::step"] = torch.tensor([u.st.steps[trainable_i]], dtype=torch.int64)
                trainable_i += 1
        fname = f"unit-{u.index:05d}.safetensors"
        path = os.path.join(tmp, fname)
        save_file(tensors, path)
        _fsync_path(path)
        shards.append({"file": fname, "sha256": _sha256(path), "params": [s.name for s in u.slots]})
    rng = {"cpu": torch.get_rng_state()}
    if engine.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(engine.device)
    rpath = os.path.join(tmp, "rng.safetensors")
    save_file(rng, rpath)
    _fsync_path(rpath)
    manifest = {
        "format": FORMAT, "version": VERSION, "micro": engine.micro, "steps_applied": engine.steps_applied,
        "steps_skipped": engine.steps_skipped, "grad_accum": engine.grad_accum,
        "dtype": str(engine.dtype).replace("torch.", ""),
        "optimizer": engine.optimizer.state_dict(), "shards": shards,
        "rng": {"file": "rng.safetensors", "sha256": _sha256(rpath)},
        "placement": {u.name: [u.plan.params_home, u.plan.states_home] for u in engine.units},
    }
    mpath = os.path.join(tmp, "manifest.json")
    with open(mpath, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_path(tmp, directory=True)
    old = None
    if os.path.exists(directory):
        old = f"{directory}.old-{os.getpid()}"
        os.rename(directory, old)
    os.rename(tmp, directory)
    _fsync_path(parent, directory=True)
    if old:
        shutil.rmtree(old)


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt or does not match the model."""


def _resolve(directory):
    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(os.path.join(directory, "manifest.json")):
        return directory
    # A crash between moving the old checkpoint aside and renaming the new one leaves only the old.
    parent, base = os.path.split(directory)
    olds = sorted(n for n in os.listdir(parent) if n.startswith(base + ".old-")) if os.path.isdir(parent) else []
    for n in olds:
        cand = os.path.join(parent, n)
        if os.path.exists(os.path.join(cand, "manifest.json")):
            return cand
    raise CheckpointError(f"{directory}: no complete checkpoint (manifest.json missing)")


def _safe_member(directory, name):
    if os.path.isabs(name) or ".." in name.split("/") or "/" in name:
        raise CheckpointError(f"{directory}: manifest names a file outside the checkpoint: {name!r}")
    path = os.path.join(directory, name)
    if os.path.islink(path):
        raise CheckpointError(f"{directory}: {name} is a symbolic link; refusing to read it")
    return path


def load(engine, directory):
    directory = _resolve(directory)
    with open(os.path.join(directory, "manifest.json")) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CheckpointError(f"{directory}: not an offload checkpoint of version {VERSION}")
    index = {}
    for shard in manifest["shards"]:
        path = _safe_member(directory, shard["file"])
        if _sha256(path) != shard["sha256"]:
            raise CheckpointError(f"{path}: checksum mismatch (truncated or corrupted shard)")
        for name in shard["params"]:
            index[name] = path
    rpath = _safe_member(directory, manifest["rng"]["file"])
    if _sha256(rpath) != manifest["rng"]["sha256"]:
        raise CheckpointError(f"{rpath}: checksum mismatch")
    missing = [s.name for u in engine.units for s in u.slots if s.name not in index]
    if missing:
        raise CheckpointError(f"{directory}: no values for {len(missing)} parameters, e.g. {missing[:3]}")
    engine.sync()
    handles = {}
    try:
        for u in engine.units:
            compute = torch.zeros(u.numel, dtype=engine.dtype)
            n = u.numel_train
            master, m, v = (torch.zeros(n, dtype=torch.float32) for _ in range(3))
            steps = []
            for s in u.slots:
                path = index[s.name]
                if path not in handles:
                    handles[path] = safe_open(path, framework="pt")
                h = handles[path]
                sl = slice(s.offset, s.offset + s.numel)
                t = h.get_tensor(f"{s.name}::param")
                if tuple(t.shape) != tuple(s.shape):
                    raise CheckpointError(f"{path}: {s.name} has shape {tuple(t.shape)}, the model {tuple(s.shape)}")
                compute[sl] = t.reshape(-1).to(engine.dtype)
                if s.trainable:
                    master[sl] = h.get_tensor(f"{s.name}::master").reshape(-1)
                    m[sl] = h.get_tensor(f"{s.name}::exp_avg").reshape(-1)
                    v[sl] = h.get_tensor(f"{s.name}::exp_avg_sq").reshape(-1)
                    steps.append(int(h.get_tensor(f"{s.name}::step")[0]))
            engine.tiers.write_unit(u, compute, master, m, v)
            if n:
                u.st.steps = steps
                u.st.has_grad = [False] * len(steps)
    finally:
        handles.clear()
    with safe_open(rpath, framework="pt") as h:
        torch.set_rng_state(h.get_tensor("cpu"))
        if engine.device.type == "cuda" and "cuda" in h.keys():
            torch.cuda.set_rng_state(h.get_tensor("cuda"), engine.device)
    engine.optimizer.load_state_dict(manifest["optimizer"])
    engine.micro = manifest["micro"]
    engine.steps_applied = manifest["steps_applied"]
    engine.steps_skipped = manifest["steps_skipped"]
    if engine.tiers.cuda:
        torch.cuda.synchronize(engine.device)


def save_pretrained(engine, directory, **kwargs):
    """Trained weights as Hugging Face safetensors (through the model's own save_pretrained when it has one)."""
    state = engine.state_dict()
    directory = os.fspath(directory)
    if hasattr(engine.module, "save_pretrained"):
        engine.module.save_pretrained(directory, state_dict=state, safe_serialization=True, **kwargs)
        return
    os.makedirs(directory, exist_ok=True)
    seen, unique = {}, {}
    for k, t in state.items():       # tied weights: safetensors stores one copy
        key = id(t)
        if key not in seen:
            seen[key] = k
            unique[k] = t.contiguous()
    save_file(unique, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
