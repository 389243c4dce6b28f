"""Checkpoints of an engine sharded over several ranks, and loading any checkpoint on any number of ranks.

Layout a save on N ranks writes (beside checkpoint.py's one-process layout, with the same crash-consistency
protocol): per unit and rank, unit-<u>-rank-<r>.safetensors holding that rank's slices as flat tensors
(Note [shard layout] in shard.py): "param" (compute dtype, [prefix slice | rest slice]) and, for a trainable
unit, "master", "exp_avg", "exp_avg_sq" (fp32, prefix slice); rng-rank-<r>.safetensors; and manifest.json
with "world": N, per unit its layout (length, trainable prefix, every parameter's name, offset, shape and
whether it trains), the AdamW step counts and every file's sha256. Every rank writes its files into rank 0's
temporary directory; rank 0 writes the manifest once every rank has reported success, then commits.

Loading re-slices: each rank takes, for every parameter, the part that falls into its slice under the
current layout, from wherever the saved layout put it: a one-process checkpoint's per-parameter tensors, or
the saved ranks' flat slices (partial reads, never a whole unit per rank). So a checkpoint written on any
number of ranks loads on any other, one included. Only the files a rank reads are checksummed by it, and all
ranks agree that every check passed before any state changes.
"""
import os
import shutil

import torch

from . import checkpoint as ck
from .checkpoint import CheckpointError


def _rank_file(kind, index, rank):
    return f"{kind}-{index:05d}-rank-{rank:05d}.safetensors" if index is not None else f"{kind}-rank-{rank:05d}.safetensors"


# ---- save ------------------------------------------------------------------------------------------------------
def _write_rank(engine, tmp, rank):
    """This rank's unit files and RNG state; returns their manifest records."""
    units = []
    for u in engine.units:
        compute, master, m, v = engine.tiers.read_unit(u)
        tensors = {"param": compute.contiguous()}
        if master is not None:
            tensors.update(master=master.contiguous(), exp_avg=m.contiguous(), exp_avg_sq=v.contiguous())
        name = _rank_file("unit", u.index, rank)
        path = os.path.join(tmp, name)
        ck._write_private(tensors, path)
        units.append({"file": name, "sha256": ck._sha256(path)})
        ck._kill_point("data")
    rng = {"cpu": torch.get_rng_state()}
    if engine.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(engine.device)
    name = _rank_file("rng", None, rank)
    ck._write_private(rng, os.path.join(tmp, name))
    return {"units": units, "rng": {"file": name, "sha256": ck._sha256(os.path.join(tmp, name))}}


def _manifest(engine, records):
    units = []
    for i, u in enumerate(engine.units):
        units.append({
            "name": u.name, "numel": u.numel, "numel_train": u.numel_train,
            "params": [[s.name, s.offset, s.numel, list(s.shape), s.trainable] for s in u.slots],
            "steps": list(u.st.steps or []),
            "files": [rec["units"][i] for rec in records],        # index = rank
        })
    return dict(ck.manifest_header(engine), world=len(records), units=units, rng=[rec["rng"] for rec in records])


def save_sharded(engine, directory):
    """engine.save() on several ranks: a collective, every rank calls it with the same directory."""
    comm = engine.comm
    directory = os.path.abspath(os.fspath(directory))
    engine.sync()
    tmp, error = None, None
    if comm.rank == 0:
        try:
            tmp = ck.make_tmp(directory)
        except Exception as e:
            error = e
    comm.check_all(error, f"creating the checkpoint directory for {directory}")
    tmp = comm.broadcast_object(tmp, "the checkpoint's temporary directory")
    record, error = None, None
    try:
        record = _write_rank(engine, tmp, comm.rank)
    except Exception as e:
        error = e
    try:
        comm.check_all(error, f"writing checkpoint {directory}")
        records = comm.all_gather_object(record, "the checkpoint's file list")
    except BaseException:
        if comm.rank == 0:     # a failed save leaves nothing behind
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    error = None
    if comm.rank == 0:
        try:
            ck.write_manifest(tmp, _manifest(engine, records))
            ck.commit(tmp, directory)
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)
            error = e
    comm.check_all(error, f"committing checkpoint {directory}")


# ---- sources: where a parameter's values are in a saved checkpoint ----------------------------------------------
class _Files:
    """Opens manifest members once each, after checking their sha256."""

    def __init__(self, directory):
        self.directory, self.handles, self.checked = directory, {}, {}

    def verify(self, member):
        name, sha = member["file"], member["sha256"]
        if name not in self.checked:
            self.checked[name] = ck._safe_member(self.directory, name, sha)
        return self.checked[name]

    def open(self, member):
        path = self.verify(member)
        if path not in self.handles:
            self.handles[path] = ck._open_shard(path)
        return self.handles[path]


class NamedSource:
    """A one-process checkpoint: "<name>::<kind>" tensors per parameter."""

    def __init__(self, directory, manifest):
        self.files = _Files(directory)
        self.members = {}
        try:
            for shard in manifest["shards"]:
                for name in shard["params"]:
                    self.members[name] = shard
            self.rng_member = manifest["rng"]
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{directory}: malformed manifest entry ({e!r})") from None

    def has(self, name):
        return name in self.members

    def check(self, name, shape, trainable, lo, hi):
        h = self.files.open(self.members[name])
        got = tuple(h.get_slice(f"{name}::param").get_shape())
        if got != tuple(shape):
            raise CheckpointError(f"{self.members[name]['file']}: {name} has shape {got}, the model {tuple(shape)}")
        if trainable and f"{name}::master" not in h.keys():
            raise CheckpointError(f"{self.members[name]['file']}: {name} trains now but was saved frozen "
                                  f"(no optimizer state)")

    def read(self, name, kind, lo, hi):
        return self.files.open(self.members[name]).get_tensor(f"{name}::{kind}").reshape(-1)[lo:hi]

    def step(self, name):
        return int(self.files.open(self.members[name]).get_tensor(f"{name}::step")[0])

    def rng_file(self, rank):
        return self.rng_member


class ShardedSource:
    """A checkpoint of W ranks: per unit and rank, flat slices laid out as Note [shard layout] says."""

    def __init__(self, directory, manifest):
        self.directory = directory
        self.files = _Files(directory)
        self.params = {}
        try:
            self.world = int(manifest["world"])
            self.rng_members = list(manifest["rng"])
            for unit in manifest["units"]:
                steps = iter(unit["steps"])
                for name, offset, numel, shape, trainable in unit["params"]:
                    self.params[name] = (unit, int(offset), int(numel), tuple(shape), bool(trainable),
                                         next(steps) if trainable else None)
                if len(unit["files"]) != self.world:
                    raise CheckpointError(f"{directory}: unit {unit['name']} has {len(unit['files'])} files "
                                          f"for {self.world} ranks")
        except (KeyError, TypeError, ValueError, StopIteration) as e:
            raise CheckpointError(f"{directory}: malformed manifest entry ({e!r})") from None

    def has(self, name):
        return name in self.params

    def _pieces(self, name, lo, hi):
        """(file member, first local element, count) covering elements [lo, hi) of a saved parameter."""
        unit, offset, _, _, trainable, _ = self.params[name]
        big_t, numel = int(unit["numel_train"]), int(unit["numel"])
        t, f = big_t // self.world, (numel - big_t) // self.world
        pos, end = offset + lo, offset + hi
        while pos < end:
            if trainable:
                r = pos // t
                start, base = r * t, 0
                stop = start + t
            else:
                r = (pos - big_t) // f
                start, base = big_t + r * f, t
                stop = start + f
            n = min(end, stop) - pos
            yield unit["files"][r], base + pos - start, n
            pos += n

    def check(self, name, shape, trainable, lo, hi):
        _, _, _, saved_shape, saved_trainable, _ = self.params[name]
        if saved_shape != tuple(shape):
            raise CheckpointError(f"{self.directory}: {name} has shape {saved_shape}, the model {tuple(shape)}")
        if trainable and not saved_trainable:
            raise CheckpointError(f"{self.directory}: {name} trains now but was saved frozen (no optimizer state)")
        for member, _, _ in self._pieces(name, lo, hi):
            self.files.verify(member)

    def read(self, name, kind, lo, hi):
        parts = [self.files.open(member).get_slice(kind)[first:first + n]
                 for member, first, n in self._pieces(name, lo, hi)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def step(self, name):
        return int(self.params[name][5])

    def rng_file(self, rank):
        return self.rng_members[rank] if rank < len(self.rng_members) else None


# ---- load --------------------------------------------------------------------------------------------------------
def _parts(engine):
    """(unit, slot, (first element, count, local position) or None) for every parameter of every unit."""
    for u in engine.units:
        for s in u.slots:
            yield u, s, u.shard.part(s.offset, s.numel, s.trainable)


def _check(engine, source, directory):
    missing = [s.name for u in engine.units for s in u.slots if not source.has(s.name)]
    if missing:
        raise CheckpointError(f"{directory}: no values for {len(missing)} parameters, e.g. {missing[:3]}")
    for _, s, part in _parts(engine):
        lo, n = (part[0], part[1]) if part is not None else (0, 0)
        source.check(s.name, s.shape, s.trainable, lo, lo + n)
    rank = engine.comm.rank if engine.comm else 0
    member = source.rng_file(rank)
    return None if member is None else source.files.verify(member)


def load_resliced(engine, directory, manifest):
    """engine.load() when the checkpoint or the engine is sharded (a collective with several ranks)."""
    source = (ShardedSource if "world" in manifest else NamedSource)(directory, manifest)
    comm = engine.comm
    error, rng_path = None, None
    try:
        rng_path = _check(engine, source, directory)
    except Exception as e:
        error = e
    if comm is not None:   # every rank's checks passed before any rank changes anything
        comm.check_all(error, f"checking checkpoint {directory}")
    elif error is not None:
        raise error
    engine.sync()
    for u in engine.units:
        spec = u.shard
        compute = torch.zeros(spec.local, dtype=engine.dtype)
        states = [torch.zeros(spec.train, dtype=torch.float32) for _ in range(3)]
        steps = []
        for s in u.slots:
            if s.trainable:
                steps.append(source.step(s.name))
            part = spec.part(s.offset, s.numel, s.trainable)
            if part is None:
                continue
            lo, n, pos = part
            compute[pos:pos + n] = source.read(s.name, "param", lo, lo + n).to(engine.dtype)
            if s.trainable:
                for kind, buf in zip(("master", "exp_avg", "exp_avg_sq"), states):
                    buf[pos:pos + n] = source.read(s.name, kind, lo, lo + n)
        # A resident flat is left stale: it is gathered at its next use, when every rank gathers it too.
        engine.tiers.write_unit(u, compute, *states)
        if spec.train:
            u.st.steps = steps
            u.st.has_grad = [False] * len(steps)
    if rng_path is not None:
        with ck._open_shard(rng_path) as h:
            torch.set_rng_state(h.get_tensor("cpu"))
            if engine.device.type == "cuda" and "cuda" in h.keys():
                torch.cuda.set_rng_state(h.get_tensor("cuda"), engine.device)
    ck.restore_counters(engine, manifest)
