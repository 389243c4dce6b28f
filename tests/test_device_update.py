"""AdamW on the compute device for arena states (Note [device-side AdamW] in offload/plan.py).

On the CPU the compute device is the CPU, so the schedule runs synchronously with the engine's fp32 AdamW:
these tests hold its bookkeeping (which units, step counts, skipped steps, checkpoints) to plain PyTorch.
The CUDA path (side streams, staging chunks, the fused kernel) is in test_engine_gpu.py."""
import copy

import pytest
from hypothesis import given, strategies as st
import torch

import offload
from offload import plan as plan_mod
from offload.plan import DEFAULT_RATES, assign_update_sites, plan_placement
from offload.groups import split_units
from conftest import HP, assert_runs_match, param_count, run_reference, train_engine
from models import make_gpt, make_mlp, mlp_batches, token_batches


def _engine(model, share, monkeypatch, **kw):
    """Params resident on the compute side, states in the arena, a forced device-side share."""
    monkeypatch.setattr(plan_mod, "DEVICE_UPDATE_SHARE", share)
    n = param_count(model)
    return offload.engine(model, optimizer=offload.AdamW(**HP), device="cpu", dtype=torch.float32,
                          gpu_memory=4 * n + (1 << 16), cpu_memory=None, **kw)


@pytest.mark.parametrize("share", [0.5, 1.0])
@pytest.mark.parametrize("make, batches", [(make_mlp, mlp_batches), (make_gpt, token_batches)])
def test_parity_with_torch_adamw(make, batches, share, monkeypatch):
    model, data = make(), batches(5)
    ref = run_reference(model, data)
    with _engine(copy.deepcopy(model), share, monkeypatch) as eng:
        sites = [p.update_on for p in eng.plan.units if p.states_home == "cpu"]
        assert "device" in sites and (share == 1.0) == ("host" not in sites), sites
        got = train_engine(eng, data)
    assert all(got.stepped)
    assert_runs_match(got, ref, model)


def test_nonfinite_gradient_skips_device_updates(monkeypatch):
    """A poisoned micro-batch in eager mode: every unit is updated on the device, all are skipped, no step
    count moves, and training then follows a reference that skipped that batch."""
    model, data = make_mlp(), mlp_batches(5)
    ref = run_reference(model, data, skip={2})
    with _engine(copy.deepcopy(model), 1.0, monkeypatch) as eng:
        got = train_engine(eng, data[:2])
        before = eng.state_dict()
        loss = eng(**data[2]).loss
        got.losses.append(loss.item())
        eng.backward(loss * float("inf"))
        with pytest.warns(RuntimeWarning, match="non-finite gradient"):
            got.stepped.append(eng.step())
        after = eng.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        rest = train_engine(eng, data[3:])
    assert got.stepped == [True, True, False]
    got.losses += rest.losses
    got.stepped += rest.stepped
    got.state = rest.state
    assert_runs_match(got, ref, model)


def test_resume_from_checkpoint_equals_uninterrupted(monkeypatch, tmp_path):
    model, data = make_gpt(), token_batches(6)
    with _engine(copy.deepcopy(model), 0.5, monkeypatch) as eng:
        full = train_engine(eng, data)
    with _engine(copy.deepcopy(model), 0.5, monkeypatch) as eng:
        train_engine(eng, data[:3])
        eng.save(tmp_path / "ckpt")
    with _engine(copy.deepcopy(model), 0.5, monkeypatch) as eng:
        eng.load(tmp_path / "ckpt")
        rest = train_engine(eng, data[3:])
    assert rest.losses == full.losses[3:]
    for k in full.state:
        assert torch.equal(rest.state[k], full.state[k]), k


def _plan(model):
    units = split_units(model)
    n = param_count(model)
    return units, plan_placement(units, itemsize=2, device="cuda:0", gpu_budget=2 * n + (1 << 16),
                                 cpu_budget=None, nvme=None, grad_accum=1, activations="keep")


def test_planner_balances_cpu_against_pcie():
    """With CPU AdamW at the rate PCIe streams states (12 B per element each way) and nothing else on PCIe,
    about half the elements go to the device, interleaved, and the host gradient buffers they no longer
    need leave the arena."""
    units, plan = _plan(make_gpt())
    arena = plan.arena_bytes
    pcie = 12.0   # GB/s each way: 1e9 elements/s of states
    rates = dict(DEFAULT_RATES, cpu_adam_gparams_s=1.0, pcie_h2d_gb_s=pcie, pcie_d2h_gb_s=pcie, pcie_gb_s=2 * pcie)
    assign_update_sites(plan, rates, gpu_room=float("inf"))
    cand = [p for p in plan.units if p.states_home == "cpu"]
    dev = sum(p.numel_train for p in cand if p.update_on == "device")
    total = sum(p.numel_train for p in cand)
    # balance: (total - dev) / 1e9 = base + dev * 10 B / 12e9, base = the gradients and params it still moves
    assert 0.3 * total < dev < 0.6 * total, (dev, total)
    assert plan.arena_bytes < arena
    assert "adamw" in str(plan) and "runs on the device" in plan.notes[-1]


def test_planner_leaves_cpu_alone_without_room_or_candidates():
    units, plan = _plan(make_gpt())
    assign_update_sites(plan, DEFAULT_RATES, gpu_room=0)
    assert all(p.update_on == "host" for p in plan.units)
    rates = dict(DEFAULT_RATES, cpu_adam_gparams_s=1000.0)     # a CPU far faster than PCIe: nothing to gain
    assign_update_sites(plan, rates, gpu_room=float("inf"))
    assert all(p.update_on == "host" for p in plan.units)


def test_fused_adamw_contract():
    """What DeviceUpdater relies on in torch._fused_adamw_ (checked on its CPU kernel, which reads the flags
    as the CUDA one does): fp32 lists, a 0-dim fp32 step it does not increment, and a 0-dim fp32 found_inf
    that, at 1.0, leaves params and moments untouched; a gradient of another dtype is refused, hence the
    staged fp32 copy of the compute-dtype gradients."""
    torch.manual_seed(0)
    p, g, m, v = (torch.randn(1000) for _ in range(4))
    v = v.abs()
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1, eps=1e-8, amsgrad=False, maximize=False)
    step = torch.full((), 3.0)
    before = [t.clone() for t in (p, m, v)]
    torch._fused_adamw_([p], [g], [m], [v], [], [step], found_inf=torch.ones(()), **kw)
    assert all(torch.equal(a, b) for a, b in zip((p, m, v), before)) and step.item() == 3.0
    torch._fused_adamw_([p], [g], [m], [v], [], [step], found_inf=torch.zeros(()), **kw)
    assert step.item() == 3.0
    ref = [t.clone().requires_grad_(i == 0) for i, t in enumerate(before)]
    opt = torch.optim.AdamW([ref[0]], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    ref[0].grad = g.clone()
    opt.state[ref[0]] = dict(step=torch.tensor(2.0), exp_avg=ref[1], exp_avg_sq=ref[2])
    opt.step()
    torch.testing.assert_close(p, ref[0].detach(), rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError):
        torch._fused_adamw_([p], [g.bfloat16()], [m], [v], [], [step], **kw)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_host_update_of_resident_params_leaves_gradless_ones_alone(monkeypatch, grad_accum):
    """Parameters resident on the compute side, their states in the arena and every update on the host
    (share 0): the AdamW output copied back to the device shares its buffer with the gradients, so a unit
    where only some parameters got a gradient must hand back the others unchanged, not the gradient bytes
    under them."""
    from models import make_partly_used, skip_batches
    from test_engine_features import SKIP_PATTERN
    model, data = make_partly_used(), skip_batches(SKIP_PATTERN)
    ref = run_reference(model, data, grad_accum=grad_accum)
    with _engine(copy.deepcopy(model), 0.0, monkeypatch, grad_accum=grad_accum) as eng:
        assert [s.name for u in eng.units for s in u.slots if u.name == "mid"] == ["mid.weight", "mid.extra"]
        mid = next(p for p in eng.plan.units if p.name == "mid")
        assert (mid.update_on, mid.params_home, mid.states_home) == ("host", "gpu", "cpu"), str(eng.plan)
        got = train_engine(eng, data)
    assert_runs_match(got, ref, model)


@given(n=st.integers(1, 200), data=st.data())
def test_fill_unchanged_writes_master_exactly_outside_the_segments(n, data):
    from offload.optim import fill_unchanged
    cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=8)))
    bounds = list(zip(cuts[::2], cuts[1::2]))            # disjoint [a, b) in order, possibly empty
    segments = [(a, b - a, 1) for a, b in data.draw(st.permutations(bounds))]
    master = torch.randn(n)
    out = torch.full((n,), -7.0, dtype=torch.bfloat16)
    fill_unchanged(out, master, segments)
    inside = torch.zeros(n, dtype=torch.bool)
    for a, k, _ in segments:
        inside[a:a + k] = True
    assert torch.equal(out[~inside], master[~inside].to(torch.bfloat16))
    assert (out[inside] == -7.0).all()


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_bf16_host_update_of_resident_params(monkeypatch, grad_accum):
    """bf16 training on the CPU with parameters resident and every update on the host: the native AdamW
    writes its bf16 output over the bf16 gradients it reads (one buffer), and training follows an fp32-master
    bf16-autocast reference within the bf16 tolerances of the GPU tests."""
    from test_engine_gpu import GPU_HP, assert_bf16_close
    monkeypatch.setattr(plan_mod, "DEVICE_UPDATE_SHARE", 0.0)
    model, data = make_gpt(), token_batches(4)
    ref = run_reference(model, data, hp=GPU_HP, autocast_dtype=torch.bfloat16, grad_accum=grad_accum)
    n = param_count(model)
    with offload.engine(copy.deepcopy(model), optimizer=offload.AdamW(**GPU_HP), device="cpu",
                        dtype=torch.bfloat16, gpu_memory=4 * n + (1 << 16), cpu_memory=None,
                        grad_accum=grad_accum) as eng:
        shared = [u for u in eng.units if u.plan.update_on == "host" and u.plan.params_home == "gpu"
                  and u.plan.states_home == "cpu"]
        assert shared and all(u.st.out is u.st.grad for u in shared), str(eng.plan)
        got = train_engine(eng, data)
    assert_bf16_close(got, ref, model)
