"""Sharding of units over the ranks of a torch.distributed process group (ZeRO stage 3 over the tiers).

With a process group of N > 1 ranks, every rank owns 1/N of each unit: of its fp32 master and AdamW
moments, of its compute-dtype resting copy (arena or NVMe) and of its host gradient buffers, each under the
rank's own budgets. Before a unit runs, the ranks all-gather its compute-dtype parameters into the full flat
buffer on the compute device; once its gradients are complete they are reduce-scattered and divided by N
(the data-parallel mean: N ranks on N equal slices of a batch equal one process on the whole batch), and each
rank updates its own slice on its CPU (or device). The same code runs gloo on the CPU and NCCL on GPUs.

Note [shard layout]: a unit's flat buffer has two regions, the trainable prefix [0, numel_train) and the
frozen rest [numel_train, numel); groups.py pads each to a multiple of PAD_ELEMS * N. Rank r owns slice
[r*t, (r+1)*t) of the prefix (t = numel_train / N) and slice [numel_train + r*f, numel_train + (r+1)*f) of the
rest (f = (numel - numel_train) / N). Its local buffers are laid out [prefix slice | rest slice], so its master
and moments cover exactly local[:t], as the unsharded layout's cover flat[:numel_train]. One all-gather per
region fills the full flat in place (the rank slices of a region are contiguous in rank order); a unit without
frozen parameters needs one collective. With N = 1 the local buffers are the full ones.

Note [global skip]: the non-finite skip must be decided alike on every rank, or the shards of one model
would diverge. A rank whose full (pre-reduction) gradient of a unit has a non-finite value fills the whole
buffer with NaN before the reduce-scatter, so the reduced slice of *every* rank is non-finite: the per-unit
decisions (eager mode) and the per-step flag agree everywhere without an extra collective per unit; step()
still all-reduces the flag and the squared norm once per step.

Note [wide reduction]: gradients are summed across ranks in the next wider dtype (fp32 in fp64, bf16/fp16 in
fp32) and divided by N there, then rounded once to the buffer's dtype. Backends add in their own order (a ring
starts each slice at a different rank), and in the gradient's own dtype the result would depend on it; an
element whose terms cancel would then carry rounding noise that AdamW, dividing by sqrt(v), turns into a full
step. In the wider dtype the sum of a few ranks' terms is exact, so the mean is the correctly rounded one
whatever the order (and for bf16 training the reduction keeps fp32 precision, as FSDP's reduce_dtype does).
It costs twice the reduce-scatter bytes.

Note [dead peer]: a collective whose peer died fails instead of hanging: gloo reports the closed connection
(or the process group's timeout expires) and the error is raised as DistError naming the collective, the unit
and the number of ranks. init_from_env() takes the timeout from OFFLOAD_DIST_TIMEOUT (seconds). Under NCCL
a lost peer surfaces through NCCL's watchdog at the same timeout, which aborts the process.

Limitations: every rank must run the same modules in the same order each step (data-dependent control flow
that skips a module on one rank only would pair different collectives); parameters resident on the compute
device are kept whole on every rank (only their optimizer state is sharded).
"""
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import ConfigError, DistError

TIMEOUT_ENV = "OFFLOAD_DIST_TIMEOUT"
WIDER = {torch.float32: torch.float64, torch.bfloat16: torch.float32, torch.float16: torch.float32}
DEFAULT_TIMEOUT_S = 600.0
# The fused tensor collectives under their current names (torch 2.13 renamed them *_single; the older names
# warn there), else under the older ones; Comm falls back to the list forms where neither exists or works.
_ALL_GATHER = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or getattr(dist, "reduce_scatter_tensor", None)
_init_timeout_s = None   # the timeout init_from_env() gave the group, for error messages


@dataclass(frozen=True)
class ShardSpec:
    """One rank's share of one unit's flat buffer (Note [shard layout]); lengths in elements."""
    rank: int
    world: int
    numel: int          # the unit's full, padded flat length
    numel_train: int    # its full, padded trainable prefix

    def __post_init__(self):
        if self.numel_train % self.world or (self.numel - self.numel_train) % self.world:
            raise ValueError(f"unit of {self.numel} elements ({self.numel_train} trainable) does not split over "
                             f"{self.world} ranks: build the units with split_units(..., shards={self.world})")

    @property
    def train(self):
        """Local length of the trainable slice: the extent of this rank's master, moments and gradients."""
        return self.numel_train // self.world

    @property
    def frozen(self):
        return (self.numel - self.numel_train) // self.world

    @property
    def local(self):
        return self.train + self.frozen

    @property
    def train_start(self):
        return self.rank * self.train

    @property
    def frozen_start(self):
        return self.numel_train + self.rank * self.frozen

    def take(self, full):
        """This rank's local [prefix slice | rest slice] of a full flat tensor (the tensor itself when N = 1)."""
        if self.world == 1:
            return full
        return torch.cat((full[self.train_start:self.train_start + self.train],
                          full[self.frozen_start:self.frozen_start + self.frozen]))

    def put(self, full, local):
        """Writes a local buffer into this rank's slices of a full flat tensor."""
        full[self.train_start:self.train_start + self.train].copy_(local[:self.train])
        if self.frozen:
            full[self.frozen_start:self.frozen_start + self.frozen].copy_(local[self.train:self.local])

    def put_train(self, full, local_train, non_blocking=False):
        full[self.train_start:self.train_start + self.train].copy_(local_train, non_blocking=non_blocking)

    def part(self, offset, numel, trainable):
        """Where a parameter at [offset, offset + numel) of the full flat meets this rank's slice:
        (first element of the parameter, element count, position in the local buffer), or None."""
        start, length = (self.train_start, self.train) if trainable else (self.frozen_start, self.frozen)
        lo, hi = max(offset, start), min(offset + numel, start + length)
        if lo >= hi:
            return None
        base = 0 if trainable else self.train
        return lo - offset, hi - lo, base + lo - start


def spec_for(unit, comm):
    if comm is None:
        return ShardSpec(0, 1, unit.numel, unit.numel_train)
    return ShardSpec(comm.rank, comm.world, unit.numel, unit.numel_train)


# ---- the process group ----------------------------------------------------------------------------------------
def timeout_from_env():
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r}: must be a positive number of seconds")
    return value


def init_from_env(device_type):
    """Under torchrun (WORLD_SIZE > 1 in the environment), initialises the default process group, unless the
    caller already did: gloo for device_type "cpu", NCCL for "cuda" (each rank on GPU LOCAL_RANK), with the
    timeout from OFFLOAD_DIST_TIMEOUT. Returns True when a group of more than one rank is in use."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    global _init_timeout_s
    _init_timeout_s = timeout_from_env()
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=_init_timeout_s))
    return True


def current_comm(device):
    """A Comm over the default process group when one of more than one rank is initialised, else None."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    backend = str(dist.get_backend())
    need = "nccl" if device.type == "cuda" else "gloo"
    if need not in backend:
        raise ConfigError(f"device {device} with a '{backend}' process group: initialise torch.distributed with "
                          f"backend '{need}' (or 'cpu:gloo,cuda:nccl') for this device")
    return Comm(device)


class Comm:
    """The collectives the engine needs, over the default process group, with their failures turned into
    DistError (Note [dead peer]). Tensors are moved to the backend's device when they are elsewhere (NCCL
    collectives of CPU tensors, at checkpoints and state_dict())."""

    def __init__(self, device):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
        self.backend = str(dist.get_backend())
        self.device = device if device.type == "cuda" else torch.device("cpu")
        # Fused tensor collectives where the backend has them; otherwise the list forms (see _all_gather and
        # _reduce_scatter): decided on first use, since older gloo builds lack them.
        self.fused_gather = self.fused_scatter = True

    # ---- failure reporting --------------------------------------------------------------------------------
    def _fail(self, what, e):
        limit = f" of {_init_timeout_s:g} s" if _init_timeout_s else ""
        detail = str(e).splitlines()[0] if str(e) else ""
        raise DistError(f"{what} across {self.world} ranks failed on rank {self.rank}: a peer process exited, or "
                        f"did not answer within the process group's timeout{limit}; {type(e).__name__}: {detail}") from e

    def _run(self, what, fn, *args):
        try:
            return fn(*args)
        except DistError:
            raise
        except (RuntimeError, ValueError, ConnectionError) as e:   # DistBackendError is a RuntimeError
            self._fail(what, e)

    # ---- tensor collectives -------------------------------------------------------------------------------
    def _all_gather(self, out, local):
        if self.fused_gather and _ALL_GATHER is not None:
            try:
                _ALL_GATHER(out, local)
                return
            except NotImplementedError:
                self.fused_gather = False
        # The list form writes the same bytes: rank slices of `out` are contiguous in rank order.
        dist.all_gather(list(out.chunk(self.world)), local)

    def _reduce_scatter(self, out, full):
        if self.fused_scatter and _REDUCE_SCATTER is not None:
            try:
                _REDUCE_SCATTER(out, full)
                return
            except NotImplementedError:
                self.fused_scatter = False
        # Backends without reduce-scatter (gloo before torch 2.x): all-reduce the whole buffer and keep this
        # rank's slice. N times the traffic of a reduce-scatter, same result.
        dist.all_reduce(full)
        out.copy_(full[self.rank * out.numel():(self.rank + 1) * out.numel()])

    def gather_flat(self, u, local, flat):
        """Fills the full flat of unit u from every rank's local [prefix slice | rest slice] (in place when
        `local` is a view of `flat`'s own slice). Asynchronous on CUDA: ordered on the current stream."""
        spec = u.shard
        what = f"all_gather of unit '{u.name}'"
        if spec.train:
            self._run(what, self._all_gather, flat[:spec.numel_train], local[:spec.train])
        if spec.frozen:
            self._run(what, self._all_gather, flat[spec.numel_train:spec.numel], local[spec.train:spec.local])

    def reduce_grads(self, u, full, target, accumulate):
        """The data-parallel mean of u's full gradient `full` (numel_train, compute dtype; Note [global skip]
        and Note [wide reduction]): this rank's slice is written into `target` (added when accumulate)."""
        wide = full.to(WIDER[full.dtype])
        wide.masked_fill_(~torch.isfinite(wide).all(), float("nan"))
        out = torch.empty(u.shard.train, dtype=wide.dtype, device=wide.device)
        self._run(f"reduce_scatter of the gradients of unit '{u.name}'", self._reduce_scatter, out, wide)
        out.div_(self.world)
        if accumulate:
            target.add_(out)
        else:
            target.copy_(out)

    def gather_unit(self, u, compute, master):
        """Full CPU copies of u's compute-dtype flat and fp32 master from every rank's local ones."""
        spec = u.shard
        flat = torch.empty(spec.numel, dtype=compute.dtype, device=self.device)
        self.gather_flat(u, compute.to(self.device), flat)
        full_master = None
        if master is not None:
            full_master = torch.empty(spec.numel_train, dtype=master.dtype, device=self.device)
            self._run(f"all_gather of the master weights of unit '{u.name}'", self._all_gather, full_master,
                      master.to(self.device))
            full_master = full_master.cpu()
        return flat.cpu(), full_master

    def broadcast_(self, tensor, what):
        """Rank 0's values into `tensor` on every rank (in place)."""
        t = tensor.to(self.device)
        self._run(f"broadcast of {what}", dist.broadcast, t, 0)
        if t is not tensor:
            tensor.copy_(t)

    def all_sum(self, values, what):
        """Element-wise sums over the ranks of a list of floats (in float64)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        self._run(f"all_reduce of {what}", dist.all_reduce, t)
        return t.tolist()

    # ---- objects and barriers -------------------------------------------------------------------------------
    def all_gather_object(self, obj, what):
        out = [None] * self.world
        self._run(f"all_gather of {what}", dist.all_gather_object, out, obj)
        return out

    def broadcast_object(self, obj, what):
        box = [obj]
        self._run(f"broadcast of {what}", dist.broadcast_object_list, box, 0)
        return box[0]

    def check_all(self, error, what):
        """Every rank reports the exception it met (or None); when any rank failed, every rank raises (its own
        exception, or DistError naming the failed rank), so no rank goes on alone into a collective that a
        failed one will never join."""
        report = None if error is None else f"{type(error).__name__}: {error}"
        reports = self.all_gather_object(report, f"the outcome of {what}")
        if error is not None:
            raise error
        bad = [(r, e) for r, e in enumerate(reports) if e is not None]
        if bad:
            r, e = bad[0]
            raise DistError(f"{what} failed on rank {r} of {self.world}: {e}")
