"""Checkpoints of every tier: safetensors shards (one per unit) plus a manifest written last.

Layout of a checkpoint directory: unit-00000.safetensors ... (per parameter: "<name>::param" in the compute
dtype, and for trainable ones "<name>::master", "<name>::exp_avg", "<name>::exp_avg_sq" in fp32 and
"<name>::step" int64), rng.safetensors, manifest.json (format, step counters, optimizer hyperparameters,
the shard list with sha256 of every file). Shards are keyed by parameter name, not by unit, so a checkpoint
loads into any tier layout. Saving streams unit by unit (never the whole model in RAM) into a temporary
directory, fsyncs, then renames it into place; an existing checkpoint stays valid until the new one is
complete (it is moved aside, replaced, then removed). Nothing on the load path unpickles.

Note: crash consistency. At every instant <dir> or <dir>.old-<pid> holds a complete checkpoint, and load()
only ever reads one of those two: <dir>.tmp-<pid> is never considered, so a save killed at any point (or
failing with ENOSPC) leaves the previous checkpoint as what load() returns. A failed save removes its tmp
dir; one of a killed process is removed by the next save (its pid is no longer alive). Files are 0600 and
directories 0700: a checkpoint holds the whole model, readable by its owner only.
OFFLOAD_CHECKPOINT_KILL_AT=<phase> SIGKILLs the saving process at that phase ("data", "manifest",
"rename", "dirsync"); tests/test_reliability.py uses it to prove the note above.

Limitations: the manifest itself is not authenticated (someone who can write the directory can write a
consistent manifest); members are checked before they are opened, not through the same fd (a writer racing
load() inside the directory is out of scope).
"""
import hashlib
import json
import os
import re
import shutil
import signal
import stat

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


def _kill_point(phase):
    # Fault injection for the crash-consistency tests: SIGKILL, not an exception, so no cleanup runs.
    if os.environ.get("OFFLOAD_CHECKPOINT_KILL_AT") == phase:
        os.kill(os.getpid(), signal.SIGKILL)


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # exists, owned by someone else
        return True
    return True


def _remove_stale(directory, kind):
    """Remove <directory>.<kind>-<pid> left by processes that no longer exist (a killed save)."""
    parent, base = os.path.split(directory)
    for n in os.listdir(parent):
        m = re.fullmatch(re.escape(f"{base}.{kind}-") + r"(\d+)", n)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(os.path.join(parent, n), ignore_errors=True)


def _fsync_path(path, directory=False):
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_private(tensors, path):
    save_file(tensors, path)
    # chmod after the write: safetensors creates with the umask, but the file is unreachable by others
    # meanwhile because its directory is already 0700.
    os.chmod(path, 0o600)
    _fsync_path(path)


def _write_unit_shard(engine, u, path):
    """One unit's shard. Its tensors live only in this frame, so save() never holds two units at once."""
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
    _write_private(tensors, path)


def save(engine, directory):
    if engine.comm is not None:     # several ranks: shard_checkpoint.py, same protocol
        from .shard_checkpoint import save_sharded
        return save_sharded(engine, directory)
    directory = os.path.abspath(os.fspath(directory))
    engine.sync()
    tmp = make_tmp(directory)
    try:
        _write_tmp(engine, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)     # a failed save (ENOSPC, ...) leaves nothing behind
        raise
    commit(tmp, directory)


def make_tmp(directory):
    """The private temporary directory a save of `directory` writes into."""
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    _remove_stale(directory, "tmp")     # before writing: a killed save's shards may be what fills the disk
    tmp = f"{directory}.tmp-{os.getpid()}"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp, mode=0o700)
    os.chmod(tmp, 0o700)                # makedirs' mode passes through the umask; the result must be exactly 0700
    return tmp


def commit(tmp, directory):
    """Moves a complete tmp directory into place (Note: crash consistency)."""
    parent = os.path.dirname(directory)
    old = None
    if os.path.exists(directory):
        old = f"{directory}.old-{os.getpid()}"
        os.rename(directory, old)
    _kill_point("rename")
    try:
        os.rename(tmp, directory)
    except BaseException:
        if old:                         # put the previous checkpoint back where load() looks first
            os.rename(old, directory)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _kill_point("dirsync")
    _fsync_path(parent, directory=True)
    if old:
        shutil.rmtree(old)
    # Only now, with <dir> complete and durable, may a killed save's fallback copy go.
    _remove_stale(directory, "old")


def _write_tmp(engine, tmp):
    shards = []
    for u in engine.units:
        fname = f"unit-{u.index:05d}.safetensors"
        path = os.path.join(tmp, fname)
        _write_unit_shard(engine, u, path)
        shards.append({"file": fname, "sha256": _sha256(path), "params": [s.name for s in u.slots]})
        _kill_point("data")
    rng = {"cpu": torch.get_rng_state()}
    if engine.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(engine.device)
    rpath = os.path.join(tmp, "rng.safetensors")
    _write_private(rng, rpath)
    manifest = dict(manifest_header(engine), shards=shards,
                    rng={"file": "rng.safetensors", "sha256": _sha256(rpath)})
    write_manifest(tmp, manifest)


def manifest_header(engine):
    """The manifest entries every checkpoint has besides its data files."""
    return {
        "format": FORMAT, "version": VERSION, "micro": engine.micro, "steps_applied": engine.steps_applied,
        "steps_skipped": engine.steps_skipped, "grad_accum": engine.grad_accum,
        "dtype": str(engine.dtype).replace("torch.", ""), "optimizer": engine.optimizer.state_dict(),
        "placement": {u.name: [u.plan.params_home, u.plan.states_home] for u in engine.units},
    }


def write_manifest(tmp, manifest):
    """manifest.json, last, durable with its directory."""
    mpath = os.path.join(tmp, "manifest.json")
    with os.fdopen(os.open(mpath, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_path(tmp, directory=True)
    _kill_point("manifest")


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


# A member is a plain file name ending in .safetensors: no directories, no '..', no absolute paths, and no
# other format (a pickle named in a tampered manifest is refused by name, before it is ever opened).
_MEMBER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\.safetensors")


def _safe_member(directory, name, sha256):
    """The path of a manifest member whose content matches ``sha256``; CheckpointError naming it otherwise."""
    if not isinstance(name, str) or not _MEMBER.fullmatch(name):
        raise CheckpointError(f"{directory}: manifest names a file outside the checkpoint or not a "
                              f"safetensors shard: {name!r}")
    path = os.path.join(directory, name)
    try:
        st = os.lstat(path)
    except OSError as e:
        raise CheckpointError(f"{path}: missing shard ({e.strerror})") from None
    if stat.S_ISLNK(st.st_mode):
        raise CheckpointError(f"{path}: is a symbolic link; refusing to read it")
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path}: not a regular file")
    if _sha256(path) != sha256:
        raise CheckpointError(f"{path}: checksum mismatch (truncated or corrupted shard)")
    return path


def _read_manifest(directory):
    path = os.path.join(directory, "manifest.json")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:       # ValueError: bad JSON or bad UTF-8
        raise CheckpointError(f"{path}: unreadable manifest: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CheckpointError(f"{directory}: not an offload checkpoint of version {VERSION}")
    files = "units" if "world" in manifest else "shards"     # several ranks' layout: shard_checkpoint.py
    missing = [k for k in (files, "rng", "optimizer", "micro", "steps_applied", "steps_skipped")
               if k not in manifest]
    if missing:
        raise CheckpointError(f"{path}: manifest lacks {missing}")
    return manifest


def _open_shard(path):
    # A file with a matching checksum that is not safetensors (e.g. a pickle) fails here, never unpickled.
    try:
        return safe_open(path, framework="pt")
    except Exception as e:
        raise CheckpointError(f"{path}: not a safetensors file: {e}") from None


def load(engine, directory):
    directory = _resolve(directory)
    manifest = _read_manifest(directory)
    if engine.comm is not None or "world" in manifest:   # re-sliced for this engine's ranks
        from .shard_checkpoint import load_resliced
        return load_resliced(engine, directory, manifest)
    # Every member is verified before the engine's state is touched: a rejected checkpoint changes nothing.
    index = {}
    try:
        for shard in manifest["shards"]:
            path = _safe_member(directory, shard["file"], shard["sha256"])
            for name in shard["params"]:
                index[name] = path
        rpath = _safe_member(directory, manifest["rng"]["file"], manifest["rng"]["sha256"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{directory}: malformed manifest entry ({e!r})") from None
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
                    handles[path] = _open_shard(path)
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
    with _open_shard(rpath) as h:
        torch.set_rng_state(h.get_tensor("cpu"))
        if engine.device.type == "cuda" and "cuda" in h.keys():
            torch.cuda.set_rng_state(h.get_tensor("cuda"), engine.device)
    restore_counters(engine, manifest)


def restore_counters(engine, manifest):
    engine.optimizer.load_state_dict(manifest["optimizer"])
    engine.micro = manifest["micro"]
    engine.steps_applied = manifest["steps_applied"]
    engine.steps_skipped = manifest["steps_skipped"]
    if engine.tiers.cuda:
        torch.cuda.synchronize(engine.device)


def save_pretrained(engine, directory, **kwargs):
    """Trained weights as Hugging Face safetensors (through the model's own save_pretrained when it has one).
    With several ranks every rank calls it (the weights are gathered) and rank 0 writes."""
    state = engine.state_dict()
    comm = engine.comm
    if comm is None:
        _write_pretrained(engine, state, directory, **kwargs)
        return
    error = None
    if comm.rank == 0:
        try:
            _write_pretrained(engine, state, directory, **kwargs)
        except Exception as e:
            error = e
    comm.check_all(error, "save_pretrained")


def _write_pretrained(engine, state, directory, **kwargs):
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
