"""Shared pieces of the engine parity suite: tier budgets, the plain-PyTorch reference loop, the
same loop through the engine, and the comparisons.

Everything here is written against the public contract in DESIGN.md ("The user's view") only.
"""
import copy
import dataclasses
import math
import os
import sys
from pathlib import Path

# bench/'s helpers (host_overhead's allocation counting), appended so that no bench script's name shadows a
# module the tests import (host_overhead itself puts bench/ first once imported; no name clashes today).
sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))

# Deterministic cuBLAS for the GPU sync tests; must be set before the first cuBLAS handle exists.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest
import torch
import torch.nn as nn

MIXES = ("device", "cpu", "cpu+nvme", "nvme")

# AdamW hyperparameters used by every parity test: non-default betas and a large weight decay, so that
# an engine ignoring either (or decaying a parameter that got no gradient) is off by far more than 1e-5.
HP = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)

# fp32 tolerances (DESIGN.md: an fp32 run on device="cpu" equals torch.optim.AdamW step for step).
LOSS_TOL = dict(rtol=1e-5, atol=1e-6)
STATE_TOL = dict(rtol=1e-5, atol=1e-5)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ------------------------------------------------------------------------------------------ budgets

STATE_BYTES_PER_PARAM = 16   # fp32 compute copy + fp32 master + m + v
DEVICE_ROOMY = 4             # "device" mix: the compute budget holds DEVICE_ROOMY * S


def unique_params(model):
    return list(model.parameters())           # nn.Module.parameters() already de-duplicates tied ones


def param_count(model, trainable_only=False):
    return sum(p.numel() for p in unique_params(model) if p.requires_grad or not trainable_only)


def tier_kwargs(model, mix, tmp_path, *, grad_accum=1, dtype=torch.float32, device="cpu", shards=1):
    """gpu_memory / cpu_memory / nvme for offload.engine() so that ``mix`` happens. The ONE place the
    budgets are chosen. They come from the engine's own accounting (offload.plan), so each mix is exact
    (per rank when the engine runs on ``shards`` ranks):

      mix        gpu_memory              cpu_memory                      nvme
      device     DEVICE_ROOMY * S        None (planned)                  None
      cpu        W                       everything off-device fits      None
      cpu+nvme   W                       NVMe minimum + half the rest    tmp_path/"nvme"
      nvme       W                       NVMe minimum (staging, grads)   tmp_path/"nvme"

    S = 16 bytes per parameter (full fp32 model state); W = the streaming working set (a few flat buffers
    of the largest unit), so params stream through the compute side; the "NVMe minimum" is the gradient
    buffers plus disk staging, with nothing of the model state left on the CPU.
    """
    from offload.engine import ACTIVATION_SHARE
    from offload.groups import split_units
    from offload.plan import host_memory_bounds, plan_placement, stream_working_set

    itemsize = torch.empty((), dtype=dtype).element_size()
    S = STATE_BYTES_PER_PARAM * param_count(model)
    if mix == "device":
        return dict(gpu_memory=DEVICE_ROOMY * S + (1 << 20), cpu_memory=None, nvme=None)
    units = split_units(model, shards=shards)
    W = stream_working_set(units, itemsize)
    if device != "cpu":    # the engine keeps a share of a GPU budget for activations
        W = int(W / (1 - ACTIVATION_SHARE)) + 1
    reserve = int(W * ACTIVATION_SHARE) if device != "cpu" else 0
    minimum, everything = host_memory_bounds(units, itemsize=itemsize, gpu_budget=W, grad_accum=grad_accum,
                                             act_reserve=reserve, shards=shards)
    if mix == "cpu":
        return dict(gpu_memory=W, cpu_memory=everything, nvme=None)
    nvme = Path(tmp_path) / "nvme"
    nvme.mkdir(parents=True, exist_ok=True)

    def placed(cpu):
        return plan_placement(units, itemsize=itemsize, device=device, gpu_budget=W, cpu_budget=cpu,
                              nvme=[str(nvme)], grad_accum=grad_accum, activations="keep",
                              act_reserve=reserve, shards=shards).bytes

    if mix == "nvme":
        cpu = minimum
        ok = placed(cpu)["cpu"] == 0 and placed(cpu)["nvme"] > 0
    elif mix == "cpu+nvme":
        # the budget nearest the middle of [minimum, everything] that really splits states over both tiers
        steps = [minimum + (everything - minimum) * k // 32 for k in range(1, 32)]
        steps.sort(key=lambda c: abs(c - (minimum + everything) // 2))
        cpu = next((c for c in steps if placed(c)["cpu"] > 0 and placed(c)["nvme"] > 0), None)
        ok = cpu is not None
    else:
        raise ValueError(f"unknown mix {mix!r}; one of {MIXES}")
    if not ok:
        pytest.skip(f"{type(model).__name__} is too small for the {mix} mix beside the NVMe staging buffers")
    return dict(gpu_memory=W, cpu_memory=cpu, nvme=str(nvme))


def assert_mix(engine, mix):
    """The plan really placed model state the way ``mix`` intends (engine.plan.bytes per tier)."""
    b = engine.plan.bytes
    assert set(b) == {"gpu", "cpu", "nvme"}, b
    assert all(isinstance(v, int) and v >= 0 for v in b.values()), b
    if mix == "device":
        # On a GPU the device's states may start in host memory until the first step has measured the
        # activations (Note [device states after the first step] in offload/plan.py).
        held = sum(p.numel_train // p.shards * 12 for p in engine.plan.units if p.promote)
        assert b["gpu"] > 0 and b["cpu"] == held and b["nvme"] == 0, (mix, b)
    elif mix == "cpu":
        assert b["cpu"] > 0 and b["nvme"] == 0, (mix, b)
    elif mix == "cpu+nvme":
        assert b["cpu"] > 0 and b["nvme"] > 0, (mix, b)
    elif mix == "nvme":
        assert b["nvme"] > 0 and b["cpu"] == 0, (mix, b)
    else:
        raise ValueError(mix)


def plan_total_bounds(model):
    """Bounds on sum(engine.plan.bytes) for an fp32 run: every param once (4 B) plus m and v (8 B) for
    trainable ones at least; at most also a separate master and a grad buffer (8 B more per trainable
    param), plus 4 KiB alignment for up to four flat buffers per module that owns parameters."""
    p_all, p_train = param_count(model), param_count(model, trainable_only=True)
    owners = sum(1 for m in model.modules() if any(True for _ in m.parameters(recurse=False)))
    return 4 * p_all + 8 * p_train, 4 * p_all + 16 * p_train + 4 * 4096 * owners


# ------------------------------------------------------------------------------------- the two loops

@dataclasses.dataclass
class Run:
    losses: list              # unscaled loss of every micro-batch, as Python floats
    stepped: list             # per micro-batch: did the optimizer step close there
    state: dict               # final weights, name -> CPU fp32 tensor
    lrs: list = dataclasses.field(default_factory=list)        # lr in param_groups[0] at each micro-batch
    norms: list = dataclasses.field(default_factory=list)      # reference only: pre-clip global grad norms
    states: list = dataclasses.field(default_factory=list)     # per-step snapshots when asked for


def _to(batch, device):
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def _snapshot(model):
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in model.state_dict().items()}


def run_reference(model, batches, *, grad_accum=1, clip=None, scheduler=None, skip=(), hp=HP,
                  device="cpu", autocast_dtype=None, snapshots=False):
    """Plain PyTorch: deep-copies ``model``, trains it with torch.optim.AdamW(foreach=False) over the
    trainable params, (loss / grad_accum).backward() per micro-batch, clip_grad_norm_ then step then
    zero_grad(set_to_none=True) when the window closes, ``scheduler(opt)`` stepped after each update.
    Micro-batches whose index is in ``skip`` are forwarded (the loss is recorded) but contribute nothing:
    that is what an engine skipping a non-finite step must equal."""
    model = copy.deepcopy(model).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, foreach=False, **hp)
    sched = scheduler(opt) if scheduler is not None else None
    run = Run(losses=[], stepped=[], state={})
    for i, batch in enumerate(batches):
        run.lrs.append(opt.param_groups[0]["lr"])
        with torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype,
                            enabled=autocast_dtype is not None):
            loss = model(**_to(batch, device)).loss
        run.losses.append(loss.detach().float().item())
        if i in skip:
            run.stepped.append(False)
            continue
        (loss / grad_accum).backward()
        closes = (i + 1) % grad_accum == 0
        run.stepped.append(closes)
        if closes:
            grads = [p.grad for p in params if p.grad is not None]
            run.norms.append(torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])).item())
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(params, clip, foreach=False)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if sched is not None:
                sched.step()
            if snapshots:
                run.states.append(_snapshot(model))
    run.state = _snapshot(model)
    return run


def make_engine(model, *, mix, tmp_path, hp=HP, device="cpu", dtype=torch.float32, shards=1, **kw):
    """offload.engine over ``model`` (not copied: the engine may take ownership) with the mix's budgets
    (per rank, for a run on ``shards`` ranks)."""
    import offload

    return offload.engine(model, optimizer=offload.AdamW(**hp), device=device, dtype=dtype,
                          **tier_kwargs(model, mix, tmp_path, grad_accum=kw.get("grad_accum", 1), dtype=dtype,
                                        device=device, shards=shards), **kw)


def train_engine(engine, batches, *, scheduler=None, poison=(), snapshots=False, device="cpu", run=None):
    """The user's loop through the engine: loss = engine(**batch).loss; engine.backward(loss);
    stepped = engine.step(); the scheduler steps when the update was applied. Micro-batches whose index is
    in ``poison`` have their loss multiplied by inf (a non-finite loss and non-finite gradients)."""
    sched = scheduler(engine.optimizer) if scheduler is not None else None
    run = run if run is not None else Run(losses=[], stepped=[], state={})
    for i, batch in enumerate(batches):
        run.lrs.append(engine.optimizer.param_groups[0]["lr"])
        loss = engine(**_to(batch, device)).loss
        run.losses.append(loss.detach().float().item())
        if i in poison:
            loss = loss * float("inf")
        engine.backward(loss)
        stepped = engine.step()
        assert isinstance(stepped, bool), f"engine.step() returned {type(stepped).__name__}, not bool"
        run.stepped.append(stepped)
        if stepped and sched is not None:
            sched.step()
        if stepped and snapshots:
            run.states.append(engine.state_dict())
    run.state = engine.state_dict()
    return run


def run_engine(model, batches, *, mix, tmp_path, scheduler=None, poison=(), snapshots=False,
               device="cpu", **engine_kw):
    """Deep-copies ``model``, wraps it in an engine with the mix's budgets, checks the mix happened,
    trains on ``batches`` and returns a Run; the engine is always closed."""
    model = copy.deepcopy(model)
    with make_engine(model, mix=mix, tmp_path=tmp_path, device=device, **engine_kw) as engine:
        assert_mix(engine, mix)
        return train_engine(engine, batches, scheduler=scheduler, poison=poison, snapshots=snapshots,
                            device=device)


# -------------------------------------------------------------------------------------- comparisons

def param_keys(model):
    """Every state_dict key that names a parameter, tied aliases included."""
    return {n for n, _ in model.named_parameters(remove_duplicate=False)}


def assert_state_close(got, ref, model, **tol):
    """engine.state_dict() against the reference's: every parameter key present (tied ones under both
    names), no key the model does not have, fp32 CPU tensors of the same shape, values within ``tol``."""
    tol = tol or STATE_TOL
    missing = param_keys(model) - set(got)
    assert not missing, f"engine.state_dict() lacks parameter keys {sorted(missing)}"
    extra = set(got) - set(ref)
    assert not extra, f"engine.state_dict() has keys the model does not: {sorted(extra)}"
    for k, v in got.items():
        assert torch.is_tensor(v), k
        assert v.device.type == "cpu", (k, v.device)
        assert v.dtype == torch.float32, (k, v.dtype)
        assert v.shape == ref[k].shape, (k, v.shape, ref[k].shape)
        torch.testing.assert_close(v, ref[k], msg=lambda m, k=k: f"{k}: {m}", **tol)


def assert_losses_close(got, ref, **tol):
    tol = tol or LOSS_TOL
    assert len(got) == len(ref), (len(got), len(ref))
    for i, (a, b) in enumerate(zip(got, ref)):
        assert math.isfinite(a) == math.isfinite(b), (i, a, b)
        if math.isfinite(b):
            assert abs(a - b) <= tol["atol"] + tol["rtol"] * abs(b), f"loss at micro-batch {i}: {a} vs {b}"


def assert_runs_match(got, ref, model, loss_tol=None, state_tol=None):
    assert got.stepped == ref.stepped, (got.stepped, ref.stepped)
    assert_losses_close(got.losses, ref.losses, **(loss_tol or LOSS_TOL))
    assert_state_close(got.state, ref.state, model, **(state_tol or STATE_TOL))


@pytest.fixture(params=MIXES)
def mix(request):
    return request.param
