"""Engine features, each as a parity test against plain PyTorch on device="cpu", dtype=float32:
gradient accumulation, clipping, frozen and tied parameters, parameters without a gradient, LR
schedulers, save/load, activation policies, non-finite steps; then input errors, the plan, cleanup.
"""
import copy
import json
import math
import os
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import offload
from conftest import (HP, Run, assert_mix, assert_runs_match, assert_state_close,
                      make_engine, param_count, plan_total_bounds, run_engine, run_reference,
                      tier_kwargs, train_engine)
from models import (frozen_names, make_frozen_gpt, make_gpt, make_mlp, make_skip, mlp_batches,
                    skip_batches, token_batches)


# ------------------------------------------------------------------------------ gradient accumulation

def test_grad_accum(mix, tmp_path):
    """grad_accum=3: engine.backward scales each micro-batch loss by 1/3, step() is True only on every
    third call; equals (loss/3).backward() x3 then AdamW.step() in plain PyTorch."""
    model = make_gpt()
    batches = token_batches(6)
    ref = run_reference(model, batches, grad_accum=3)
    got = run_engine(model, batches, mix=mix, tmp_path=tmp_path, grad_accum=3)
    assert got.stepped == [False, False, True, False, False, True]
    assert_runs_match(got, ref, model)


# ------------------------------------------------------------------------------------------ clipping

CLIP = 0.05


def test_clip_grad_norm(mix, tmp_path):
    """clip_grad_norm=c equals torch.nn.utils.clip_grad_norm_(params, c) before AdamW.step()."""
    model = make_gpt()
    batches = token_batches(5)
    ref = run_reference(model, batches, clip=CLIP)
    assert min(ref.norms) > 2 * CLIP, f"clipping would not trigger: pre-clip norms {ref.norms}"
    unclipped = run_reference(model, batches)
    assert any(abs(a - b) > 1e-3 for a, b in zip(ref.losses, unclipped.losses)), "clipping changes nothing"
    got = run_engine(model, batches, mix=mix, tmp_path=tmp_path, clip_grad_norm=CLIP)
    assert_runs_match(got, ref, model)


def test_clip_with_grad_accum(tmp_path):
    model = make_mlp()
    batches = mlp_batches(4)
    ref = run_reference(model, batches, grad_accum=2, clip=CLIP)
    assert min(ref.norms) > CLIP
    got = run_engine(model, batches, mix="cpu+nvme", tmp_path=tmp_path, grad_accum=2, clip_grad_norm=CLIP)
    assert_runs_match(got, ref, model)


# ------------------------------------------------------------------------------------- frozen params

def test_frozen_params(mix, tmp_path):
    """requires_grad=False params are never updated (bitwise equal to their initial values, as in the
    reference) while the rest trains in parity."""
    model = make_frozen_gpt()
    frozen = frozen_names(model)
    assert frozen
    init = copy.deepcopy(model.state_dict())
    batches = token_batches(5)
    ref = run_reference(model, batches)
    got = run_engine(model, batches, mix=mix, tmp_path=tmp_path)
    for k in frozen:
        assert torch.equal(ref.state[k], init[k]), k
        assert torch.equal(got.state[k], init[k]), f"frozen {k} changed"
    assert_runs_match(got, ref, model)


def test_frozen_params_have_no_optimizer_state(tmp_path):
    """Frozen params carry no master/m/v: the planned state shrinks by at least 8 bytes (m and v) per
    frozen parameter compared with the same model fully trainable."""
    totals = {}
    for name, model in (("trainable", make_gpt()), ("frozen", make_frozen_gpt())):
        with make_engine(model, mix="cpu", tmp_path=tmp_path / name) as engine:
            totals[name] = sum(engine.plan.bytes.values())
    p_frozen = param_count(make_gpt()) - param_count(make_frozen_gpt(), trainable_only=True)
    assert p_frozen > 0
    assert totals["frozen"] <= totals["trainable"] - 8 * p_frozen, (totals, p_frozen)


# -------------------------------------------------------------------------------------- tied weights

def test_tied_weights(mix, tmp_path):
    """TinyGPT's LM head is the token embedding (one Parameter, gradient summed from both uses):
    parity, both state_dict keys present and still identical."""
    model = make_gpt()
    assert model.lm_head.weight is model.tok_emb.weight
    batches = token_batches(5)
    ref = run_reference(model, batches)
    got = run_engine(model, batches, mix=mix, tmp_path=tmp_path)
    assert "tok_emb.weight" in got.state and "lm_head.weight" in got.state
    assert torch.equal(got.state["tok_emb.weight"], got.state["lm_head.weight"])
    assert_runs_match(got, ref, model)


def test_reference_tie_matters():
    """Untying the head in the reference changes the result by far more than the tolerance, so the tied
    parity test would catch an engine that updates the two uses separately."""
    model = make_gpt()
    untied = copy.deepcopy(model)
    untied.lm_head.weight = torch.nn.Parameter(model.tok_emb.weight.detach().clone())
    batches = token_batches(4)
    a, b = run_reference(model, batches), run_reference(untied, batches)
    assert (a.state["tok_emb.weight"] - b.state["tok_emb.weight"]).abs().max() > 1e-3


# ------------------------------------------------------------------------ params without a gradient

SKIP_PATTERN = [True, False, False, False, True, False]


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_param_without_grad(mix, tmp_path, grad_accum):
    """SkipMLP's branch runs only on some micro-batches. In a window where it never ran its params have no
    grad: torch.optim.AdamW skips them (no decay, step count not advanced) and so must the engine. With
    grad_accum=2 and this pattern, windows 1 and 3 have a branch grad from one micro-batch, window 2 none;
    with grad_accum=1 the branch's step count falls behind the rest's, which changes its bias correction."""
    model = make_skip()
    batches = skip_batches(SKIP_PATTERN)
    ref = run_reference(model, batches, grad_accum=grad_accum, snapshots=True)
    got = run_engine(model, batches, mix=mix, tmp_path=tmp_path, grad_accum=grad_accum, snapshots=True)
    assert got.stepped == ref.stepped
    assert len(got.states) == len(ref.states)
    windows = [SKIP_PATTERN[i:i + grad_accum] for i in range(0, len(SKIP_PATTERN), grad_accum)]
    branch = [k for k in ref.state if k.startswith("branch.")]
    for w, (g, r) in enumerate(zip(got.states, ref.states)):
        assert_state_close(g, r, model)
        if w > 0 and not any(windows[w]):
            for k in branch:
                assert torch.equal(r[k], ref.states[w - 1][k]), k
                assert torch.equal(g[k], got.states[w - 1][k]), f"{k} changed in window {w} without a grad"
    assert_runs_match(got, ref, model)


def test_unit_with_some_params_gradless_on_every_tier(mix, tmp_path):
    """A unit where one parameter gets no gradient on some steps: its update covers only the others, and
    the params written back (to the device, the arena or the disk) must keep the gradless one's values."""
    from models import make_partly_used
    model, batches = make_partly_used(), skip_batches(SKIP_PATTERN)
    ref = run_reference(model, batches)
    got = run_engine(model, batches, mix=mix, tmp_path=tmp_path)
    assert_runs_match(got, ref, model)


@pytest.mark.parametrize("states", ["cpu", "nvme"])
def test_gradless_param_of_a_unit_streamed_from_disk_keeps_its_values(tmp_path, states):
    """The same on the disk tier, which the nvme mixes cannot reach with so small a model: overrides put the
    partly used unit's params there. The updated params go to the disk through a reused staging slot, so
    the gradless parameter's range must be written from its master, not left as the slot's old bytes."""
    from models import make_partly_used
    model, batches = make_partly_used(), skip_batches(SKIP_PATTERN)
    ref = run_reference(model, batches)
    (tmp_path / "nvme").mkdir()
    with offload.engine(copy.deepcopy(model), optimizer=offload.AdamW(**HP), device="cpu", dtype=torch.float32,
                        gpu_memory=1 << 20, cpu_memory=None, nvme=str(tmp_path / "nvme"),
                        overrides={"units": {"mid": {"params": "nvme", "states": states}}}) as eng:
        mid = next(p for p in eng.plan.units if p.name == "mid")
        assert (mid.params_home, mid.states_home) == ("nvme", states)
        got = train_engine(eng, batches)
    assert_runs_match(got, ref, model)


def test_reference_skip_step_count_matters():
    """Sanity: a reference that (wrongly) gives the branch a zero grad instead of None ends elsewhere,
    so the parity test above distinguishes "skipped" from "zero gradient"."""
    model = make_skip()
    batches = skip_batches(SKIP_PATTERN)
    a = run_reference(model, batches)
    m = copy.deepcopy(model)
    opt = torch.optim.AdamW(m.parameters(), foreach=False, **HP)
    for b in batches:
        m(**b).loss.backward()
        for p in m.branch.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
    diff = max((a.state[k] - v).abs().max().item() for k, v in m.state_dict().items() if k.startswith("branch."))
    assert diff > 1e-4


# -------------------------------------------------------------------------------------- LR schedules

def _halving(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)


def _step_lr(opt):
    return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)


def test_lr_scheduler(mix, tmp_path):
    """torch.optim.lr_scheduler.LambdaLR on engine.optimizer (stepped when engine.step() returns True,
    with grad_accum=2): the lr in param_groups is the one applied at each update. LRScheduler requires
    isinstance(engine.optimizer, torch.optim.Optimizer)."""
    model = make_gpt()
    batches = token_batches(6)
    ref = run_reference(model, batches, grad_accum=2, scheduler=_halving)
    got = run_engine(model, batches, mix=mix, tmp_path=tmp_path, grad_accum=2, scheduler=_halving)
    assert got.lrs == ref.lrs
    assert_runs_match(got, ref, model)


def test_step_lr(tmp_path):
    model = make_mlp()
    batches = mlp_batches(5)
    ref = run_reference(model, batches, scheduler=_step_lr)
    got = run_engine(model, batches, mix="cpu", tmp_path=tmp_path, scheduler=_step_lr)
    assert got.lrs == ref.lrs and len(set(ref.lrs)) == 3
    assert_runs_match(got, ref, model)


def test_lr_set_in_param_groups_is_used(tmp_path):
    """Writing lr=0 into engine.optimizer.param_groups makes the next update a no-op (AdamW with lr 0 also
    applies no weight decay): the weights stay bitwise equal across that step."""
    model = make_mlp()
    batches = mlp_batches(3)
    with make_engine(copy.deepcopy(model), mix="cpu", tmp_path=tmp_path) as engine:
        train_engine(engine, batches[:1])
        before = engine.state_dict()
        for g in engine.optimizer.param_groups:
            g["lr"] = 0.0
        train_engine(engine, batches[1:2])
        after = engine.state_dict()
    for k in before:
        assert torch.equal(before[k], after[k]), k


# --------------------------------------------------------------------------------------- save / load

def test_save_load_resume(mix, tmp_path):
    """save() after 3 of 6 steps, load() into a fresh engine over a fresh, differently initialised model
    instance, continue: the trajectory equals the uninterrupted engine run exactly (load resumes exactly:
    weights, m, v and step counts) and the plain-PyTorch reference within tolerance."""
    model = make_gpt()
    batches = token_batches(6)
    ref = run_reference(model, batches)
    whole = run_engine(model, batches, mix=mix, tmp_path=tmp_path / "whole")

    ckpt = tmp_path / "ckpt"
    with make_engine(copy.deepcopy(model), mix=mix, tmp_path=tmp_path / "first") as first:
        run = train_engine(first, batches[:3])
        saved = first.state_dict()
        first.save(str(ckpt))
    assert ckpt.exists()

    fresh = make_gpt(seed=1234)
    assert not torch.equal(fresh.blocks[0].fc.weight, model.blocks[0].fc.weight)
    with make_engine(fresh, mix=mix, tmp_path=tmp_path / "second") as second:
        assert_mix(second, mix)
        second.load(str(ckpt))
        loaded = second.state_dict()
        for k in saved:
            assert torch.equal(loaded[k], saved[k]), k
        train_engine(second, batches[3:], run=run)

    assert run.losses == whole.losses, (run.losses, whole.losses)
    for k in whole.state:
        assert torch.equal(run.state[k], whole.state[k]), k
    assert_runs_match(run, ref, model)


# ------------------------------------------------------------------------------- activation policies

POLICIES = ["keep", "recompute", "swap"]   # the token-wise float split belongs to the activations work


def test_activation_policies(tmp_path):
    """Every activations policy gives the reference's losses and weights, and all policies give
    bitwise-identical runs (recompute re-runs the same deterministic forward; swap copies exactly)."""
    model = make_gpt()
    batches = token_batches(4)
    ref = run_reference(model, batches)
    runs = {}
    for i, policy in enumerate(POLICIES):
        runs[policy] = run_engine(model, batches, mix="cpu", tmp_path=tmp_path / str(i), activations=policy)
        assert_runs_match(runs[policy], ref, model)
    base = runs["keep"]
    for policy, r in runs.items():
        assert r.losses == base.losses, policy
        for k in base.state:
            assert torch.equal(r.state[k], base.state[k]), (policy, k)


# ------------------------------------------------------------------------------ non-finite gradients

@pytest.mark.parametrize("poison", ["inf", "nan"])
def test_nonfinite_step_is_skipped(mix, tmp_path, poison):
    """A micro-batch whose loss (and so gradient) is inf/nan: engine.step() returns False, no weight, moment
    or step count changes, and training goes on exactly as a reference that skipped that batch.

    Run with clip_grad_norm=inf (a no-op clip, equal to none numerically): DESIGN.md updates units as their
    grads land when there is no clipping, so only the deferred path (global norm known before any unit is
    updated) can skip a step atomically."""
    model = make_mlp()
    batches = mlp_batches(5)
    ref = run_reference(model, batches, skip={2}, clip=float("inf"))
    factor = float(poison)
    m = copy.deepcopy(model)
    with make_engine(m, mix=mix, tmp_path=tmp_path, clip_grad_norm=float("inf")) as engine:
        assert_mix(engine, mix)
        got = Run(losses=[], stepped=[], state={})
        train_engine(engine, batches[:2], run=got)
        before = engine.state_dict()
        loss = engine(**batches[2]).loss
        got.losses.append(loss.item())
        engine.backward(loss * factor)
        got.stepped.append(engine.step())
        assert got.stepped[-1] is False
        after = engine.state_dict()
        for k in before:
            assert torch.equal(before[k], after[k]), k
        rest = Run(losses=[], stepped=[], state={})
        train_engine(engine, batches[3:], run=rest)
        got.losses += rest.losses
        got.stepped += rest.stepped
        got.state = rest.state
    assert got.stepped == [True, True, False, True, True]
    assert_runs_match(got, ref, model)


# -------------------------------------------------------------------------------------- bad inputs

def _dir_entries(path):
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def _assert_untouched(model, init):
    for k, v in model.state_dict().items():
        assert torch.equal(v, init[k]), f"{k} changed although engine() raised"


def test_budget_too_small_raises(tmp_path):
    model = make_gpt()
    init = copy.deepcopy(model.state_dict())
    kw = tier_kwargs(model, "cpu", tmp_path)
    kw.update(cpu_memory=4096, nvme=None)
    with pytest.raises(ValueError) as e:
        offload.engine(model, optimizer=offload.AdamW(**HP), device="cpu", dtype=torch.float32, **kw)
    msg = str(e.value)
    assert "memory" in msg.lower() or "nvme" in msg.lower(), msg
    assert any(c.isdigit() for c in msg), f"the message should give the numbers: {msg}"
    _assert_untouched(model, init)


@pytest.mark.parametrize("as_list", [False, True])
def test_missing_nvme_path_raises(tmp_path, as_list):
    model = make_mlp()
    init = copy.deepcopy(model.state_dict())
    kw = tier_kwargs(model, "nvme", tmp_path)
    missing = str(tmp_path / "no" / "such" / "dir")
    kw["nvme"] = [kw["nvme"], missing] if as_list else missing
    with pytest.raises(ValueError) as e:
        offload.engine(model, optimizer=offload.AdamW(**HP), device="cpu", dtype=torch.float32, **kw)
    assert missing in str(e.value), str(e.value)
    assert _dir_entries(tmp_path / "nvme") == []
    _assert_untouched(model, init)


@pytest.mark.parametrize("bad", [dict(activations="bogus"), dict(activations=1.5), dict(activations=-0.5),
                                 dict(grad_accum=0), dict(grad_accum=-1), dict(gpu_memory="lots"),
                                 dict(cpu_memory="12 parsecs")],
                         ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()))
def test_bad_argument_raises_before_work(tmp_path, bad):
    """Invalid options raise a ValueError subclass from offload.engine() itself, before any swap file is
    created or any weight touched, and the message names the option."""
    model = make_mlp()
    init = copy.deepcopy(model.state_dict())
    kw = tier_kwargs(model, "nvme", tmp_path)
    kw.update(bad)
    with pytest.raises(ValueError) as e:
        offload.engine(model, optimizer=offload.AdamW(**HP), device="cpu", dtype=torch.float32, **kw)
    name = next(iter(bad))
    assert name in str(e.value), f"message should name {name}: {e.value}"
    assert _dir_entries(tmp_path / "nvme") == []
    _assert_untouched(model, init)


def test_size_strings_accepted(tmp_path):
    """Sizes may be strings ("KiB", "MiB", "GiB"): the same budgets as strings give the same mix and run."""
    model = make_mlp()
    kw = tier_kwargs(model, "cpu", tmp_path)
    kw["gpu_memory"] = f"{math.ceil(kw['gpu_memory'] / 1024)}KiB"
    kw["cpu_memory"] = "1GiB"
    batches = mlp_batches(2)
    ref = run_reference(model, batches)
    with offload.engine(copy.deepcopy(model), optimizer=offload.AdamW(**HP), device="cpu",
                        dtype=torch.float32, **kw) as engine:
        assert_mix(engine, "cpu")
        got = train_engine(engine, batches)
    assert_runs_match(got, ref, model)


# --------------------------------------------------------------------------------- plan and cleanup

def test_plan_is_printable_and_sums_to_model_state(mix, tmp_path):
    model = make_gpt()
    lo, hi = plan_total_bounds(model)
    with make_engine(copy.deepcopy(model), mix=mix, tmp_path=tmp_path) as engine:
        plan = engine.plan
        text = str(plan)
        assert isinstance(text, str) and text.strip(), "str(engine.plan) is empty"
        total = sum(plan.bytes.values())
        assert lo <= total <= hi, f"plan.bytes {plan.bytes} sum {total} outside [{lo}, {hi}]"
        assert isinstance(plan.predicted_step_s, (int, float)) and plan.predicted_step_s >= 0
        assert isinstance(plan.bottleneck, str) and plan.bottleneck


@pytest.mark.parametrize("mix_name", ["cpu+nvme", "nvme"])
@pytest.mark.parametrize("how", ["close", "with", "with-error"])
def test_close_removes_swap_files(tmp_path, mix_name, how):
    """Swap files exist while the engine runs and are gone after close() / leaving the with block (also when
    the block raises): the NVMe dir is back to what it was, with no offload-run-* entries left."""
    model = make_mlp()
    kw = tier_kwargs(model, mix_name, tmp_path)
    nvme = kw["nvme"]
    marker = os.path.join(nvme, "keep-me.txt")
    with open(marker, "w") as f:
        f.write("user data")
    before = _dir_entries(nvme)
    batches = mlp_batches(1)

    def make():
        return offload.engine(copy.deepcopy(model), optimizer=offload.AdamW(**HP), device="cpu",
                              dtype=torch.float32, **kw)

    if how == "close":
        engine = make()
        try:
            train_engine(engine, batches)
            assert _dir_entries(nvme) != before, "no swap files while running in an NVMe mix"
        finally:
            engine.close()
    elif how == "with":
        with make() as engine:
            train_engine(engine, batches)
            assert _dir_entries(nvme) != before
    else:
        with pytest.raises(RuntimeError, match="boom"):
            with make() as engine:
                train_engine(engine, batches)
                raise RuntimeError("boom")
    after = _dir_entries(nvme)
    assert after == before, f"left behind: {sorted(set(after) - set(before))}"
    assert not [e for e in after if e.startswith("offload-run-")]
    assert open(marker).read() == "user data"


def test_striped_nvme(tmp_path):
    """nvme as a list of paths (striped) trains in parity and cleans both paths."""
    model = make_gpt()
    batches = token_batches(4)
    ref = run_reference(model, batches)
    kw = tier_kwargs(model, "nvme", tmp_path)
    dirs = [tmp_path / "s0", tmp_path / "s1"]
    for d in dirs:
        d.mkdir()
    kw["nvme"] = [str(d) for d in dirs]
    with offload.engine(copy.deepcopy(model), optimizer=offload.AdamW(**HP), device="cpu",
                        dtype=torch.float32, **kw) as engine:
        assert_mix(engine, "nvme")
        got = train_engine(engine, batches)
        assert all(_dir_entries(d) for d in dirs), "striping should use every path"
    assert_runs_match(got, ref, model)
    assert all(_dir_entries(d) == [] for d in dirs)


def test_trace_file_written(tmp_path):
    """trace=path records Chrome trace-event JSON (a list of events or {"traceEvents": [...]})."""
    model = make_mlp()
    path = tmp_path / "run.trace.json"
    with make_engine(copy.deepcopy(model), mix="cpu+nvme", tmp_path=tmp_path, trace=str(path)) as engine:
        train_engine(engine, mlp_batches(2))
    data = json.loads(path.read_text())
    events = data["traceEvents"] if isinstance(data, dict) else data
    assert isinstance(events, list) and events


# ------------------------------------------------------------------------------------- property test

@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(grad_accum=st.integers(1, 3), clip=st.sampled_from([None, 0.05, 1.0]), windows=st.integers(1, 2),
       mix_name=st.sampled_from(["cpu", "cpu+nvme", "nvme"]))
def test_parity_property(grad_accum, clip, windows, mix_name):
    model = make_mlp()   # enough units that every mix is possible beside the NVMe staging buffers
    batches = mlp_batches(grad_accum * windows, seed=grad_accum + 7 * windows)
    ref = run_reference(model, batches, grad_accum=grad_accum, clip=clip)
    with tempfile.TemporaryDirectory() as tmp:
        got = run_engine(model, batches, mix=mix_name, tmp_path=tmp, grad_accum=grad_accum,
                         clip_grad_norm=clip)
    assert_runs_match(got, ref, model)


@pytest.mark.parametrize("policy", ["keep", "recompute", "swap"])
def test_no_tensor_leak_across_steps(policy):
    """Steady state holds the same live tensors step after step (a recompute that kept its own graph's
    saved outputs once leaked every block's activations each step through a C++ reference cycle)."""
    import gc
    model = make_gpt()
    with offload_engine_cpu(model, policy) as engine:
        batches = token_batches(4)
        counts = []
        for b in batches:
            out = engine(**b)
            engine.backward(out.loss)
            engine.step()
            del out
            gc.collect()
            counts.append(sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor)))
        assert counts[-1] == counts[-2] == counts[-3], counts


def offload_engine_cpu(model, policy):
    import offload
    return offload.engine(model, optimizer=offload.AdamW(**HP), device="cpu", activations=policy)


@pytest.mark.parametrize("fail_at", [1, 4, 9])
@pytest.mark.parametrize("mix", ["cpu", "nvme"])
def test_optimizer_failure_raises_once_and_training_goes_on(mix, fail_at, tmp_path):
    """A CPU AdamW update that raises on the optimizer thread (a failed disk read, say) surfaces once in the
    caller's thread, wherever it lands (a gradient hook in backward, step(), the next forward). The engine
    neither hangs on the events that update would have set nor refuses the next forward as a backward still
    running: the batches after it train and their updates apply."""
    import threading
    model = make_gpt()
    eng = make_engine(copy.deepcopy(model), mix=mix, tmp_path=tmp_path)
    real, calls = eng.unit_opt.update_host, [0]

    def flaky(*a, **k):
        calls[0] += 1
        if calls[0] == fail_at:
            raise OSError("injected optimizer failure")
        return real(*a, **k)
    eng.unit_opt.update_host = flaky
    errors, applied, losses, done = [], [], [], threading.Event()

    def loop():   # on a thread, so a hang fails the test instead of stalling the suite
        try:
            for b in token_batches(5):
                try:
                    loss = eng(**b).loss
                    eng.backward(loss)
                    applied.append(eng.step())
                    losses.append(loss.item())
                except OSError as e:
                    errors.append(e)
        finally:
            done.set()
    threading.Thread(target=loop, daemon=True).start()
    assert done.wait(120), "training hung after an optimizer failure"
    eng.close()
    assert [str(e) for e in errors] == ["injected optimizer failure"]
    assert len(losses) >= 3 and all(math.isfinite(x) for x in losses) and applied[-1] is True


def _promotion_case(monkeypatch, room, units=4, numel=1000, host_other=0, auto=False, fwd_s=None, rate=1e9,
                    arena=(), fixed=(), at_landing=False):
    """Engine._plan_promotion on stand-ins of an engine after its first backward: `units` deferred blocks of
    `numel` trainable elements, `host_other` more elements updated by the CPU AdamW (parameters streamed, so
    never a candidate to follow), `arena` blocks of `numel` with states in the arena and resident parameters,
    each updated where its entry says ("host" or "device"), `fixed` names of units whose states the
    overrides fix, `room` device bytes left (act_auto.device_room), a CPU AdamW of `rate` elements/s,
    `at_landing`: the engine updates device-tier units as their gradients land (no fp32 gradient kept).
    Returns (indices promoted, claimed, the note)."""
    import importlib
    from types import SimpleNamespace as NS
    from offload import act_auto
    engine_mod = importlib.import_module("offload.engine")   # the module; offload.engine is the function
    monkeypatch.setattr(act_auto, "device_room", lambda budget, device: room)
    monkeypatch.setattr(engine_mod, "cpu_adam_rate", lambda device: rate)
    policy = "auto" if auto else "keep"

    def plan(promote, n, update_on="host", params_home="gpu"):
        return NS(promote=promote, activations=policy, states_home="cpu", update_on=update_on, numel_train=n,
                  shards=1, params_home=params_home)
    plans = [plan(True, numel) for _ in range(units)] + [plan(False, host_other, params_home="cpu")]
    plans += [plan(False, numel, update_on=where) for where in arena]
    us = [NS(index=i, name=f"u{i}", plan=p, kind="block", trainable=True, shard=NS(train=p.numel_train))
          for i, p in enumerate(plans)]
    fake = NS(units=us, plan=NS(budgets={"gpu": 1 << 40}, units=plans, notes=[]), device=None, _promoting=[],
              tiers=NS(cuda=True), comm=None, overrides=NS(units={n: (None, "cpu") for n in fixed}),
              updates_at_landing=at_landing)
    fake._arena_candidates = lambda: engine_mod.Engine._arena_candidates(fake)
    fake._device_state_bytes = lambda u: engine_mod.Engine._device_state_bytes(fake, u)
    claimed = engine_mod.Engine._plan_promotion(fake, fwd_s)
    # the chosen stay marked until they move in step() (the activation plan prices them on the device)
    assert [p.promote for p in plans] == [u in fake._promoting for u in us]
    return [u.index for u in fake._promoting], claimed, fake.plan.notes[-1]


def test_promotion_takes_deferred_states_in_order_while_room_lasts(monkeypatch):
    """Note [device states after the first step]: each promoted unit claims its master/m/v and the fp32
    gradient the device AdamW reads (16 bytes an element); units go in placement order until the room ends."""
    got, claimed, note = _promotion_case(monkeypatch, room=1 << 30)
    assert got == [0, 1, 2, 3] and claimed == 4 * 16 * 1000 and "all fit" in note
    got, claimed, note = _promotion_case(monkeypatch, room=2 * 16 * 1000 + 15)
    assert got == [0, 1] and claimed == 2 * 16 * 1000 and "states of 2 of 4" in note and "15 B" in note
    got, claimed, note = _promotion_case(monkeypatch, room=-5)
    assert got == [] and claimed == 0 and "0 B of gpu_memory" in note


def test_promotion_at_landing_claims_no_fp32_gradient(monkeypatch):
    """Note [device-tier update at landing]: where the engine updates device-tier units as their gradients
    land, a promoted unit claims its master/m/v only (12 bytes an element), so more units fit the same room."""
    room = 2 * 16 * 1000 + 15          # two units with their fp32 gradients, or two of 12 B and 8,015 B over
    got, claimed, _ = _promotion_case(monkeypatch, room=room, at_landing=True)
    assert got == [0, 1] and claimed == 2 * 12 * 1000
    got, claimed, note = _promotion_case(monkeypatch, room=room + 4 * 1000, at_landing=True, arena=("host",))
    assert got == [0, 1, 2] and claimed == 3 * 12 * 1000 and "states of 3 of 4" in note


def test_promotion_with_auto_stops_once_the_cpu_adamw_hides_under_backward(monkeypatch):
    """With "auto" activations the room is worth more to them once the CPU AdamW left on the host hides under
    backward: SWAP_HIDE_SHARE * 2 forwards. Forward 1 s, rate 1000 elements/s: backward hides 1800 elements;
    4 deferred units of 1000 and 500 more on the host: 4500 -> promote 0 (3500), 1 (2500), 2 (1500) -> hides."""
    got, claimed, note = _promotion_case(monkeypatch, room=1 << 30, host_other=500, auto=True, fwd_s=1.0,
                                         rate=1000.0)
    assert got == [0, 1, 2] and claimed == 3 * 16 * 1000
    assert "hides under backward" in note and "(1.500 s)" in note and "(1.800 s)" in note
    got, _, note = _promotion_case(monkeypatch, room=1 << 30, host_other=500, auto=True, fwd_s=10.0, rate=1000.0)
    assert got == [] and "hides under backward" in note     # 4.5 s of CPU AdamW under 18 s: nothing moves
    got, _, _ = _promotion_case(monkeypatch, room=1 << 30, host_other=500, auto=False, fwd_s=10.0, rate=1000.0)
    assert got == [0, 1, 2, 3]                              # keep: no activations to give the room to


def test_arena_states_follow_the_deferred_ones_while_room_lasts(monkeypatch):
    """Note [device states after the first step]: once every deferred unit has moved, the arena units with
    resident parameters follow in forward order while room lasts, whichever AdamW updated them; none follow
    where a deferred unit found no room, nor a unit whose states the overrides fix. With "auto", a unit the
    CPU AdamW updates stays once the CPU's rest hides under backward, while a device-side one still follows
    (its states' traffic is the link's)."""
    per = 16 * 1000
    got, claimed, note = _promotion_case(monkeypatch, room=1 << 30, arena=("host", "device"))
    assert got == [0, 1, 2, 3, 5, 6] and claimed == 6 * per
    assert "all fit; the states of 2 arena units follow" in note and "u5, u6" in note
    got, _, note = _promotion_case(monkeypatch, room=5 * per, arena=("host", "device"))
    assert got == [0, 1, 2, 3, 5] and "1 arena units follow" in note
    got, _, note = _promotion_case(monkeypatch, room=3 * per, arena=("host", "device"))
    assert got == [0, 1, 2] and "arena" not in note
    got, _, _ = _promotion_case(monkeypatch, room=1 << 30, arena=("host", "device"), fixed=("u5",))
    assert got == [0, 1, 2, 3, 6]
    # forward 1 s at 1000 elements/s: backward hides 1800; the host's 500 + 1000 of u5 after the deferred moved
    got, _, _ = _promotion_case(monkeypatch, room=1 << 30, units=1, host_other=500, auto=True, fwd_s=1.0,
                                rate=1000.0, arena=("host", "device"))
    assert got == [0, 3]
    got, _, note = _promotion_case(monkeypatch, room=1 << 30, units=0, arena=("host", "device"))
    assert got == [1, 2] and note.startswith("after the first step: the states of 2 arena units follow")


def test_backward_that_raises_gives_its_units_back_and_training_goes_on(tmp_path):
    """A block's backward raises (a hook, an out-of-memory error): the pass is forgotten, so no block is left
    counting a use from it (it would then not be given back after its next backward), and training goes on
    with finite losses."""
    armed = [True]

    def boom(module, grad_in, grad_out):
        if armed[0]:
            armed[0] = False
            raise RuntimeError("injected backward failure")
    with make_engine(copy.deepcopy(make_gpt()), mix="cpu", tmp_path=tmp_path) as eng:
        eng.module.blocks[3].register_full_backward_hook(boom)
        with pytest.raises(RuntimeError, match="injected"):
            eng.backward(eng(**token_batches(1)[0]).loss)
        got = train_engine(eng, token_batches(3))
        blocks = [u for u in eng.units if u.kind == "block"]
        users = [(u.name, u.extra.get("users")) for u in blocks]
    assert all(math.isfinite(x) for x in got.losses)
    assert blocks and all(not n for _, n in users), users


@pytest.mark.parametrize("phase", ["forward", "backward"])
def test_a_first_pass_that_raises_records_no_partial_prefetch_order(phase, tmp_path):
    """The first forward and backward record the order units are used in, which later steps prefetch by
    (Note [prefetch order]). A first pass that raises part-way must not leave its prefix recorded as the
    order: the next complete pass records the whole of it, as an engine with no failure does."""
    def orders(fail):
        armed = [fail]

        def boom(*_):
            if armed[0]:
                armed[0] = False
                raise RuntimeError("injected")
        with make_engine(copy.deepcopy(make_gpt()), mix="cpu", tmp_path=tmp_path / str(fail)) as eng:
            block = eng.module.blocks[3]
            if phase == "forward":
                block.register_forward_pre_hook(boom)
            else:
                block.register_full_backward_hook(boom)
            if fail:
                with pytest.raises(RuntimeError, match="injected"):
                    eng.backward(eng(**token_batches(1)[0]).loss)
            train_engine(eng, token_batches(2))
            return {p: list(eng.streamer.seq[p]) for p in ("forward", "backward")}
    assert orders(True) == orders(False)
