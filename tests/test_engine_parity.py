"""Parity of offload.engine against plain torch.optim.AdamW on device="cpu", dtype=float32, for every
tier mix (see conftest.tier_kwargs): losses at every step within rel 1e-5, final weights within 1e-5.

The reference_* tests check the reference loop itself, so that a failure of an engine test can be
trusted to be the engine's.
"""
import pytest
import torch

from conftest import (MIXES, assert_runs_match, param_count, run_engine, run_reference,
                      tier_kwargs)
from models import make_gpt, make_mlp, mlp_batches, token_batches

STEPS = 5


def test_mlp_parity(mix, tmp_path):
    model = make_mlp()
    batches = mlp_batches(STEPS)
    ref = run_reference(model, batches)
    got = run_engine(model, batches, mix=mix, tmp_path=tmp_path)
    assert all(got.stepped)
    assert_runs_match(got, ref, model)


def test_transformer_parity(mix, tmp_path):
    model = make_gpt()
    batches = token_batches(STEPS)
    ref = run_reference(model, batches)
    got = run_engine(model, batches, mix=mix, tmp_path=tmp_path)
    assert all(got.stepped)
    assert_runs_match(got, ref, model)


def test_engine_leaves_callers_model_alone_until_wrapped(tmp_path):
    """Sanity of the harness: run_engine/run_reference deep-copy, so the model handed in is untouched."""
    model = make_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run_reference(model, mlp_batches(2))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# ------------------------------------------------------------------------ the reference loop itself

def test_reference_is_deterministic():
    model = make_gpt()
    batches = token_batches(3)
    a, b = run_reference(model, batches), run_reference(model, batches)
    assert a.losses == b.losses
    for k in a.state:
        assert torch.equal(a.state[k], b.state[k]), k


def test_reference_moves_every_weight():
    """With the suite's lr the weights move by far more than the 1e-5 tolerance, so parity means something."""
    model = make_gpt()
    ref = run_reference(model, token_batches(STEPS))
    init = model.state_dict()
    for k, v in ref.state.items():
        assert (v - init[k]).abs().max().item() > 1e-3, k
    assert ref.losses[-1] < ref.losses[0]


def test_reference_grad_accum_matches_big_batch():
    """(loss/k).backward() over k equal micro-batches equals one step on their concatenation (MSE means)."""
    model = make_mlp()
    micro = mlp_batches(3)
    big = [dict(x=torch.cat([b["x"] for b in micro]), y=torch.cat([b["y"] for b in micro]))]
    a = run_reference(model, micro, grad_accum=3)
    b = run_reference(model, big)
    assert a.stepped == [False, False, True]
    for k in a.state:
        torch.testing.assert_close(a.state[k], b.state[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mix_name", MIXES)
def test_tier_budgets_are_ordered(mix_name, tmp_path):
    """tier_kwargs gives what each mix intends: the compute budget below the full state except for
    "device", the CPU budget below the full state for the NVMe mixes, an NVMe dir that exists."""
    for model in (make_mlp(), make_gpt()):
        kw = tier_kwargs(model, mix_name, tmp_path)
        full = 16 * param_count(model)
        if mix_name == "device":
            assert kw["gpu_memory"] > full and kw["nvme"] is None
        else:
            assert kw["gpu_memory"] < full
        if mix_name == "cpu":
            assert kw["cpu_memory"] >= 12 * param_count(model) and kw["nvme"] is None  # master, m, v fit
        if mix_name in ("cpu+nvme", "nvme"):
            # below what holds everything off-device, so something must go to disk (the mix itself is
            # asserted on engine.plan.bytes by every parity test)
            assert kw["cpu_memory"] < tier_kwargs(model, "cpu", tmp_path)["cpu_memory"]
            assert (tmp_path / "nvme").is_dir() and kw["nvme"] == str(tmp_path / "nvme")
