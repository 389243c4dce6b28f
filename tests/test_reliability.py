"""Checkpoint reliability, one behaviour per test (CPU only): crash consistency at every phase of save(),
ENOSPC, corruption and truncation, hostile manifests and pickles, file permissions, resuming into another
tier layout, and save() streaming unit by unit. See the crash-consistency Note in offload/checkpoint.py.
"""
import copy
import errno
import hashlib
import json
import os
import pickle
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import offload
from offload import checkpoint
from offload.checkpoint import CheckpointError
from conftest import HP, assert_mix, make_engine, train_engine
from models import make_gpt, make_mlp, mlp_batches, token_batches

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


def _engine(seed=0):
    return offload.engine(make_mlp(seed, depth=3), optimizer=offload.AdamW(**HP), device="cpu")


def _train(engine, batches):
    for b in batches:
        engine.backward(engine(**b).loss)
        engine.step()


def _saved(tmp_path, steps=2):
    """A checkpoint of an MLP engine after ``steps`` steps; returns (dir, state_dict at save)."""
    ckpt = tmp_path / "ckpt"
    with _engine() as e:
        _train(e, mlp_batches(steps))
        e.save(str(ckpt))
        return ckpt, e.state_dict()


def _assert_state_equal(got, want):
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def _loaded_state(ckpt):
    with _engine(seed=99) as e:
        e.load(str(ckpt))
        return e.state_dict()


def _rewrite_manifest(ckpt, edit):
    mpath = ckpt / "manifest.json"
    m = json.loads(mpath.read_text())
    edit(m)
    mpath.write_text(json.dumps(m))


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _siblings(ckpt):
    return sorted(n for n in os.listdir(ckpt.parent) if n.startswith(ckpt.name + "."))


def _dead_pid():
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# ----------------------------------------------------------------------------------------- crashes

CHILD = textwrap.dedent("""
    import os, sys
    sys.path[:0] = [{repo!r}, {tests!r}]
    import offload
    from conftest import HP
    from models import make_mlp, mlp_batches
    from safetensors.torch import save_file
    ckpt, out, phase = sys.argv[1:4]
    e = offload.engine(make_mlp(0, depth=3), optimizer=offload.AdamW(**HP), device="cpu")
    batches = mlp_batches(4)
    def train(bs):
        for b in bs:
            e.backward(e(**b).loss)
            e.step()
    train(batches[:2])
    e.save(ckpt)
    save_file(e.state_dict(), os.path.join(out, "A.safetensors"))
    train(batches[2:])
    save_file(e.state_dict(), os.path.join(out, "B.safetensors"))
    os.environ["OFFLOAD_CHECKPOINT_KILL_AT"] = phase
    e.save(ckpt)
    sys.exit(3)     # only reached if the kill point did not fire
""")

# Which checkpoint must survive a SIGKILL at each phase: B only once it has been renamed into place.
PHASES = {"data": "A", "manifest": "A", "rename": "A", "dirsync": "B"}


def test_kill_during_each_checkpoint_phase(tmp_path):
    """A child trains, saves A, trains more, then is SIGKILLed inside the save of B at each phase: load()
    returns exactly A (before B is renamed in) or exactly B (after), never a mix; a later save by a live
    process removes the dead child's leftovers."""
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(repo=str(REPO), tests=str(TESTS)))
    env = {k: v for k, v in os.environ.items() if k != "OFFLOAD_CHECKPOINT_KILL_AT"}
    procs = {}
    for phase in PHASES:                   # the children run concurrently: each import of torch is slow
        d = tmp_path / phase
        d.mkdir()
        procs[phase] = subprocess.Popen([sys.executable, str(script), str(d / "ckpt"), str(d), phase],
                                        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for phase, p in procs.items():
        out, _ = p.communicate(timeout=120)
        assert p.returncode == -signal.SIGKILL, (phase, p.returncode, out.decode()[-2000:])
    for phase, which in PHASES.items():
        d = tmp_path / phase
        a, b = load_file(d / "A.safetensors"), load_file(d / "B.safetensors")
        assert any(not torch.equal(a[k], b[k]) for k in a), "A and B must differ for the test to mean anything"
        got = _loaded_state(d / "ckpt")
        _assert_state_equal(got, a if which == "A" else b)
        with _engine() as e:               # a later save cleans the killed child's tmp-/old- directories
            e.save(str(d / "ckpt"))
        assert _siblings(d / "ckpt") == [], (phase, _siblings(d / "ckpt"))


def test_enospc_mid_checkpoint_keeps_previous(tmp_path, monkeypatch):
    """save() failing with ENOSPC on its 2nd shard raises that OSError, removes its tmp dir and leaves the
    previous checkpoint as what load() returns. Complete-looking tmp dirs are never loaded; the next save
    removes those of dead processes and leaves those of live ones alone."""
    ckpt = tmp_path / "ckpt"
    with _engine() as e:
        _train(e, mlp_batches(2))
        e.save(str(ckpt))
        a = e.state_dict()
        _train(e, mlp_batches(2, seed=5))
        real, calls = checkpoint.save_file, []

        def full_disk(tensors, path, *args, **kw):
            calls.append(path)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
            return real(tensors, path, *args, **kw)

        monkeypatch.setattr(checkpoint, "save_file", full_disk)
        with pytest.raises(OSError) as info:
            e.save(str(ckpt))
        assert info.value.errno == errno.ENOSPC
        monkeypatch.setattr(checkpoint, "save_file", real)
        assert _siblings(ckpt) == []                       # no partial directory left behind
        _assert_state_equal(_loaded_state(ckpt), a)

        # A killed save's tmp dir holding a complete, newer checkpoint is still never picked up.
        e.save(str(tmp_path / "newer"))
        stale, live = Path(f"{ckpt}.tmp-{_dead_pid()}"), Path(f"{ckpt}.tmp-1")   # pid 1 always exists
        shutil.copytree(tmp_path / "newer", stale)
        live.mkdir()
        _assert_state_equal(_loaded_state(ckpt), a)
        shutil.move(str(ckpt), str(tmp_path / "aside"))
        with pytest.raises(CheckpointError, match="no complete checkpoint"):
            _loaded_state(ckpt)
        e.save(str(ckpt))
    assert not stale.exists() and live.exists()


# -------------------------------------------------------------------------------------- corruption

def test_bitflip_checksum_names_shard(tmp_path):
    """One flipped bit in a shard's tensor data: CheckpointError (a ValueError) naming that shard, raised
    before the engine's state is touched."""
    ckpt, _ = _saved(tmp_path)
    shard = ckpt / "unit-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    with _engine(seed=99) as e:
        before = e.state_dict()
        with pytest.raises(CheckpointError, match="unit-00001.safetensors.*checksum") as info:
            e.load(str(ckpt))
        assert isinstance(info.value, ValueError)
        _assert_state_equal(e.state_dict(), before)


def test_truncated_shard_rejected(tmp_path):
    """A shard cut to half its length (a torn write): CheckpointError naming it; so is a missing shard."""
    ckpt, _ = _saved(tmp_path)
    shard = ckpt / "unit-00002.safetensors"
    os.truncate(shard, shard.stat().st_size // 2)
    with pytest.raises(CheckpointError, match="unit-00002.safetensors"):
        _loaded_state(ckpt)
    shard.unlink()
    with pytest.raises(CheckpointError, match="unit-00002.safetensors.*missing"):
        _loaded_state(ckpt)


class _Evil:
    """Unpickling this creates ``marker``: proof that something unpickled it."""

    def __init__(self, marker):
        self.marker = Path(marker)

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_file_never_unpickled(tmp_path, monkeypatch):
    """A malicious pickle beside the shards is ignored; named in a tampered manifest (with its correct
    checksum), under its own name or disguised as a shard, it is rejected with CheckpointError. It is never
    unpickled: its marker file never appears, and pickle/torch.load are never called."""
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Evil(probe)))
    assert probe.exists(), "the payload must really act when unpickled"
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Evil(marker))

    def no(*a, **k):
        raise AssertionError("load() unpickled something")

    for mod, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(mod, name, no)
    ckpt, state = _saved(tmp_path)
    (ckpt / "evil.pkl").write_bytes(payload)
    _assert_state_equal(_loaded_state(ckpt), state)        # stray files are ignored, not read

    def by_name(m):
        m["shards"][0].update(file="evil.pkl", sha256=_sha(ckpt / "evil.pkl"))
    _rewrite_manifest(ckpt, by_name)
    with pytest.raises(CheckpointError, match="evil.pkl"):
        _loaded_state(ckpt)

    ckpt2, _ = _saved(tmp_path / "second")
    (ckpt2 / "unit-00000.safetensors").write_bytes(payload)
    _rewrite_manifest(ckpt2, lambda m: m["shards"][0].update(sha256=_sha(ckpt2 / "unit-00000.safetensors")))
    with pytest.raises(CheckpointError, match="unit-00000.safetensors.*not a safetensors"):
        _loaded_state(ckpt2)
    assert not marker.exists()


def test_manifest_paths_rejected(tmp_path):
    """Manifest members that are '..'-relative, absolute, in a subdirectory, or a symlinked shard are
    refused with CheckpointError even when their checksums match (so the path, not the hash, is why)."""
    good, _ = _saved(tmp_path)
    outside = tmp_path / "outside.safetensors"
    shutil.copy(good / "unit-00000.safetensors", outside)
    sha = _sha(outside)
    cases = {"dotdot": "../outside.safetensors", "absolute": str(outside), "subdir": "sub/unit-00000.safetensors"}
    for case, name in cases.items():
        ckpt = tmp_path / case
        shutil.copytree(good, ckpt)
        _rewrite_manifest(ckpt, lambda m: m["shards"][0].update(file=name, sha256=sha))
        with pytest.raises(CheckpointError, match="outside the checkpoint"):
            _loaded_state(ckpt)
    ckpt = tmp_path / "symlink"
    shutil.copytree(good, ckpt)
    (ckpt / "unit-00000.safetensors").unlink()
    (ckpt / "unit-00000.safetensors").symlink_to(outside)
    with pytest.raises(CheckpointError, match="unit-00000.safetensors.*symbolic link"):
        _loaded_state(ckpt)


# ------------------------------------------------------------------------------------- permissions

def test_checkpoint_files_private(tmp_path, monkeypatch):
    """Even under umask 0: the tmp dir is 0700 from the first shard on, and the final checkpoint directory
    is 0700 with every file in it 0600, also after a save over an existing checkpoint."""
    ckpt = tmp_path / "ckpt"
    real, tmp_modes = checkpoint.save_file, []

    def spy(tensors, path, *a, **k):
        tmp_modes.append(stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode))
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(checkpoint, "save_file", spy)
    old_umask = os.umask(0)
    try:
        with _engine() as e:
            e.save(str(ckpt))
            e.save(str(ckpt))
    finally:
        os.umask(old_umask)
    assert tmp_modes and set(tmp_modes) == {0o700}, [oct(m) for m in tmp_modes]
    assert stat.S_IMODE(ckpt.stat().st_mode) == 0o700
    files = list(ckpt.iterdir())
    assert any(f.name == "manifest.json" for f in files)
    for f in files:
        assert f.is_file() and stat.S_IMODE(f.stat().st_mode) == 0o600, (f.name, oct(f.stat().st_mode))


# ------------------------------------------------------------------------------ layouts and memory

def test_resume_into_different_tier_layout_bitwise(tmp_path):
    """Saved from the "cpu" mix, loaded into "nvme" and "device" engines over a fresh, differently seeded
    model: state_dict() is bitwise equal, and the next 2 steps' losses and weights are bitwise equal to
    continuing the original engine."""
    model = make_gpt()
    batches = token_batches(5)
    ckpt = tmp_path / "ckpt"
    with make_engine(copy.deepcopy(model), mix="cpu", tmp_path=tmp_path / "orig") as orig:
        assert_mix(orig, "cpu")
        train_engine(orig, batches[:3])
        saved = orig.state_dict()
        orig.save(str(ckpt))
        cont = train_engine(orig, batches[3:])
    for mix in ("nvme", "device"):
        with make_engine(make_gpt(seed=1234), mix=mix, tmp_path=tmp_path / mix) as other:
            assert_mix(other, mix)
            other.load(str(ckpt))
            _assert_state_equal(other.state_dict(), saved)
            run = train_engine(other, batches[3:])
        assert run.losses == cont.losses, (mix, run.losses, cont.losses)
        _assert_state_equal(run.state, cont.state)


def test_save_streams_unit_by_unit(tmp_path, monkeypatch):
    """save() reads one unit, writes its shard, and drops its tensors before reading the next: when
    engine.tiers.read_unit is entered, no tensor it returned earlier is still alive (tracked with weakref
    finalizers), so save's extra memory is one unit's state, never the model's."""
    real_write = checkpoint.save_file
    with make_engine(make_gpt(), mix="nvme", tmp_path=tmp_path) as e:
        train_engine(e, token_batches(1))
        real_read, events, alive = e.tiers.read_unit, [], set()

        def read_unit(u):
            events.append(("read", u.index, len(alive)))
            out = real_read(u)
            for i, t in enumerate(out):
                if t is not None:
                    alive.add((u.index, i))
                    weakref.finalize(t, alive.discard, (u.index, i))
            return out

        def write(tensors, path, *a, **k):
            events.append(("write", os.path.basename(path), len(alive)))
            return real_write(tensors, path, *a, **k)

        monkeypatch.setattr(e.tiers, "read_unit", read_unit)
        monkeypatch.setattr(checkpoint, "save_file", write)
        e.save(str(tmp_path / "ckpt"))
        n = len(e.units)
    assert n > 2
    reads = [ev for ev in events if ev[0] == "read"]
    assert [ev[1] for ev in reads] == list(range(n))
    assert max(ev[2] for ev in reads) == 0, events          # nothing of an earlier unit survives
    kinds = [ev[0] for ev in events]
    assert kinds == ["read", "write"] * n + ["write"], kinds  # interleaved, then rng.safetensors
    assert max(ev[2] for ev in events) <= 4, events          # at most one unit's 4 tensors at once
