"""GPU tests (skipped without CUDA): bf16 parity against an fp32-master autocast reference, injected GPU
delays that expose missing stream syncs, and peak GPU memory within the gpu_memory budget.
"""
import contextlib
import copy
import gc

import pytest
import torch

from conftest import HP, assert_losses_close, param_count, run_engine, run_reference, train_engine
from models import hf_batches, make_gpt, make_hf, repeated_blocks, token_batches

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

BF16 = torch.bfloat16
GPU_HP = dict(HP, lr=5e-3)
STEPS = 5

# bf16 tolerances. The reference (fp32 weights, bf16 autocast, torch.optim.AdamW) and the engine (bf16
# streamed weights, fp32 master and moments) round differently. Elementwise bounds on the weights do not
# work for AdamW: an element whose gradient is near zero takes full-size steps in the direction of its
# rounding noise, so single elements legitimately differ by several steps (seen: 0.016 after 5 steps at lr
# 5e-3). What must hold: losses within rel 2e-2; per parameter, the update (final - initial) within
# UPDATE_REL_ERR of the reference's in L2; and over all parameters the updates pointing the same way,
# cosine > UPDATE_COSINE, which a dropped, doubled or stale update fails.
LOSS_RTOL = 2e-2
UPDATE_REL_ERR = 0.35
UPDATE_COSINE = 0.9


def _flat_update(state, init, keys):
    return torch.cat([(state[k].float() - init[k].float()).flatten() for k in keys])


def assert_bf16_close(got, ref, model):
    assert got.stepped == ref.stepped
    assert_losses_close(got.losses, ref.losses, rtol=LOSS_RTOL, atol=1e-3)
    init = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    keys = sorted(n for n, _ in model.named_parameters())
    for k in keys:
        g, r = got.state[k], ref.state[k]
        assert g.dtype == torch.float32 and g.device.type == "cpu", (k, g.dtype, g.device)
        du_g, du_r = g - init[k], r - init[k]
        rel = ((du_g - du_r).norm() / du_r.norm().clamp_min(1e-12)).item()
        assert rel <= UPDATE_REL_ERR, f"{k}: update differs from the reference's by {rel:.3f} (L2, relative)"
    du_g, du_r = _flat_update(got.state, init, keys), _flat_update(ref.state, init, keys)
    cos = torch.nn.functional.cosine_similarity(du_g, du_r, dim=0).item()
    assert cos > UPDATE_COSINE, f"engine and reference updates disagree in direction: cosine {cos:.3f}"


def test_nonfinite_gradients_are_caught_on_the_device(tmp_path, mix):
    """The step's non-finite check runs on the device (an inf-norm per unit into a running maximum: Note
    [non-finite check] in engine.py): a step whose loss is inf (gradients inf and nan) must be seen there in
    every tier mix and skipped whole (clip_grad_norm=inf: the atomic skip), against a reference that skips
    the same step."""
    model, batches = make_gpt(), token_batches(4)
    ref = run_reference(model, batches, hp=GPU_HP, device="cuda", autocast_dtype=BF16, skip=(2,),
                        clip=float("inf"))
    got = run_engine(model, batches, mix=mix, tmp_path=tmp_path, hp=GPU_HP, device="cuda", dtype=BF16,
                     poison=(2,), clip_grad_norm=float("inf"))
    assert got.stepped == ref.stepped == [True, True, False, True]
    assert_bf16_close(got, ref, model)


def _bf16_pair(model, batches, mix, tmp_path, **kw):
    ref = run_reference(model, batches, hp=GPU_HP, device="cuda", autocast_dtype=BF16)
    got = run_engine(model, batches, mix=mix, tmp_path=tmp_path, hp=GPU_HP, device="cuda", dtype=BF16, **kw)
    return got, ref


def test_bf16_transformer_parity(mix, tmp_path):
    model = make_gpt()
    got, ref = _bf16_pair(model, token_batches(STEPS), mix, tmp_path)
    assert_bf16_close(got, ref, model)


@pytest.mark.parametrize("mix", ["cpu", "cpu+nvme"])
def test_bf16_llama_parity(mix, tmp_path):
    pytest.importorskip("transformers")
    model = make_hf("llama")
    got, ref = _bf16_pair(model, hf_batches("llama", STEPS), mix, tmp_path)
    assert_bf16_close(got, ref, model)


# ------------------------------------------------------------------------- injected delays (syncs)

SLEEP_CYCLES = int(5e6)          # a few ms of GPU spin per call


def _sleep_grad(grad):
    torch.cuda._sleep(SLEEP_CYCLES)
    return grad


def _sleep_before_block(module, args, kwargs):
    """Forward pre-hook: spin the current stream before the block runs (a late compute stream exposes
    an H2D prefetch or slot reuse that does not wait on it), and on the block's input gradient, so the
    current stream is also late right after the block's backward (exposes a grad D2H that does not wait)."""
    torch.cuda._sleep(SLEEP_CYCLES)
    for t in list(args) + list(kwargs.values()):
        if torch.is_tensor(t) and t.requires_grad:
            t.register_hook(_sleep_grad)
            break


@contextlib.contextmanager
def _deterministic():
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev)


def _with_delays(model):
    slow = copy.deepcopy(model)
    blocks = repeated_blocks(slow)
    assert blocks
    for blk in blocks:
        blk.register_forward_pre_hook(_sleep_before_block, with_kwargs=True)
    return slow


@pytest.mark.parametrize("mix", ["cpu", "nvme"])
@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_injected_delays_change_nothing(name, mix, tmp_path):
    """The same engine run with and without torch.cuda._sleep injected before every block (hooks registered
    on the model BEFORE wrapping, kept by the engine) gives bitwise-identical losses and weights: any
    copy or slot reuse that relies on timing instead of an event shows up as a difference."""
    if name == "gpt":
        model, batches = make_gpt(), token_batches(4)
    else:
        pytest.importorskip("transformers")
        model, batches = make_hf("llama"), hf_batches("llama", 4)
    with _deterministic():
        kw = dict(mix=mix, hp=GPU_HP, device="cuda", dtype=BF16, grad_accum=2, clip_grad_norm=1.0)
        fast = run_engine(model, batches, tmp_path=tmp_path / "fast", **kw)
        slow = run_engine(_with_delays(model), batches, tmp_path=tmp_path / "slow", **kw)
    assert slow.losses == fast.losses
    for k in fast.state:
        assert torch.equal(slow.state[k], fast.state[k]), k


# ------------------------------------------------------------------------------------- peak memory

def _big_gpt():
    """~6.5M params: full fp32 state ~100 MiB, bf16 weights alone ~12 MiB."""
    return make_gpt(vocab=512, d=256, n_layer=8, n_head=4, max_len=64)


@pytest.mark.parametrize("with_nvme", [False, True])
def test_peak_gpu_memory_within_budget(tmp_path, with_nvme):
    """torch.cuda.max_memory_allocated() over construction and three steps stays within gpu_memory, for a
    budget far below the model's full state (and below its bf16 weights plus grads), so the engine must
    stream; plan.bytes["gpu"] is within the budget too."""
    import offload

    model = _big_gpt()
    full_state = 16 * param_count(model)
    gpu_memory = 16 << 20
    assert gpu_memory < full_state // 6 and gpu_memory < 4 * param_count(model)
    batches = [{k: v.cuda() for k, v in b.items()} for b in token_batches(3, seq=64, vocab=512)]
    kw = dict(gpu_memory=gpu_memory, cpu_memory=4 * full_state, nvme=None)
    if with_nvme:
        (tmp_path / "nvme").mkdir()
        kw.update(cpu_memory=full_state // 2, nvme=str(tmp_path / "nvme"))
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with offload.engine(model, optimizer=offload.AdamW(**GPU_HP), device="cuda", dtype=BF16, **kw) as engine:
        assert engine.plan.bytes["gpu"] <= gpu_memory, engine.plan.bytes
        if with_nvme:
            assert engine.plan.bytes["nvme"] > 0, engine.plan.bytes
        run = train_engine(engine, batches, device="cuda")
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    assert all(run.stepped)
    assert peak <= gpu_memory, f"peak GPU memory {peak / 2**20:.1f} MiB > gpu_memory {gpu_memory / 2**20:.1f} MiB"


# ------------------------------------------------------------------- device-side AdamW of arena states

def _device_update_engine(model, share, monkeypatch, **kw):
    import offload
    from offload import plan as plan_mod
    monkeypatch.setattr(plan_mod, "DEVICE_UPDATE_SHARE", share)
    from offload.device_update import chunk_elems, staging_bytes
    from offload.engine import ACTIVATION_SHARE
    from offload.groups import split_units
    units = split_units(model)
    flat_bytes = 2 * sum(u.numel for u in units)     # the units' padded bf16 flat buffers
    staging = staging_bytes(chunk_elems(max(u.numel_train for u in units)))
    # bf16 params resident (the budget's activation share and the staging buffers kept aside); the fp32
    # states (16 B/param) cannot fit beside them: arena states
    return offload.engine(model, optimizer=offload.AdamW(**GPU_HP), device="cuda", dtype=BF16,
                          gpu_memory=int((flat_bytes + (8 << 10) + staging) / (1 - ACTIVATION_SHARE)) + 1,
                          cpu_memory=None, **kw)


@pytest.mark.parametrize("share", [0.5, 1.0])
def test_device_side_adamw_bf16_parity(share, monkeypatch):
    """Arena states streamed through the GPU and updated by the fused kernel (side streams, staged chunks)
    match the fp32-master autocast reference like the CPU AdamW does."""
    model, batches = make_gpt(), token_batches(STEPS)
    ref = run_reference(model, batches, hp=GPU_HP, device="cuda", autocast_dtype=BF16)
    with _device_update_engine(copy.deepcopy(model), share, monkeypatch) as eng:
        assert any(p.update_on == "device" for p in eng.plan.units), str(eng.plan)
        got = train_engine(eng, batches, device="cuda")
    assert_bf16_close(got, ref, model)


def test_device_side_adamw_copies_are_traced(monkeypatch, tmp_path):
    """The states a device-side AdamW streams through the GPU (12 bytes an element each way, most of what
    crosses PCIe on the reference workload) are h2d and d2h spans on the device clock, every step, for every
    unit updated there, and the trace's bytes per link equal what the engine counted as moved."""
    from offload.device_update import CHUNK
    from test_timeline import xs
    model, batches = make_gpt(), token_batches(3)
    path = tmp_path / "run.trace.json"
    with _device_update_engine(copy.deepcopy(model), 1.0, monkeypatch, trace=str(path)) as eng:
        on_device = {u.name: sum(n for _, n, _ in eng.unit_opt._segments(u)) for u in eng.units
                     if u.plan.update_on == "device"}
        assert on_device, str(eng.plan)
        before = dict(eng.tiers.moved)
        for b in batches:
            eng.backward(eng(**{k: v.cuda() for k, v in b.items()}).loss)
            eng.step()
        eng.sync()
        moved = {k: v - before[k] for k, v in eng.tiers.moved.items()}
    ev = [e for e in xs(path) if e["args"].get("step") is not None]
    for link in ("h2d", "d2h"):
        assert sum(e["args"]["bytes"] for e in ev if e["cat"] == link) == moved[link] > 0, link
        assert all(e["args"]["clock"] == "gpu" for e in ev if e["cat"] == link)
        for name, n in on_device.items():
            spans = [e for e in ev if e["cat"] == link and e["args"]["unit"] == name]
            assert sum(e["args"]["bytes"] for e in spans) >= 12 * n * len(batches), (link, name)
            assert len(spans) >= len(batches) * -(-n // CHUNK), (link, name)


def test_device_side_adamw_small_chunks_and_delays_change_nothing(monkeypatch):
    """Chunks far smaller than a unit (several staging rounds per unit) and GPU delays before every block:
    bitwise the same losses and weights as without delays, and as with one chunk per unit."""
    from offload import device_update
    model, batches = make_gpt(), token_batches(4)
    runs = []
    with _deterministic():
        for chunk, slow in ((device_update.CHUNK, False), (4096, False), (4096, True)):
            monkeypatch.setattr(device_update, "CHUNK", chunk)
            m = _with_delays(model) if slow else copy.deepcopy(model)
            with _device_update_engine(m, 1.0, monkeypatch) as eng:
                runs.append(train_engine(eng, batches, device="cuda"))
    for r in runs[1:]:
        assert r.losses == runs[0].losses
        for k in runs[0].state:
            assert torch.equal(r.state[k], runs[0].state[k]), k


def test_close_drains_device_side_adamw_copies(monkeypatch):
    """close() straight after step(), while device-side AdamW's copies of the states back to the arena are
    held up on their stream: close() waits for them before it unpins and unmaps the arena (DMA into freed
    pages otherwise), and the device is healthy afterwards."""
    model, batches = make_gpt(), token_batches(2)
    eng = _device_update_engine(copy.deepcopy(model), 1.0, monkeypatch)
    try:
        train_engine(eng, batches[:1], device="cuda")
        store = eng.device_updater.store
        with torch.cuda.stream(store):
            torch.cuda._sleep(20 * SLEEP_CYCLES)   # every copy out of this step queues behind it
        loss = eng(**{k: v.cuda() for k, v in batches[1].items()}).loss
        eng.backward(loss)
        assert eng.step()
        last = torch.cuda.Event()
        last.record(store)
    finally:
        eng.close()
    assert last.query(), "close() returned while copies into the arena were still queued"
    torch.cuda.synchronize()


# The room after the first step is read from the allocator's reserved peak (act_auto.device_room), whose
# segments (2 and 20 MiB) alone outgrow the "device" mix's budget of a few times a tiny model's states.
ROOMY_GPU = 1 << 30


@pytest.mark.parametrize("clip", [None, 1.0], ids=["at-landing", "at-step"])
def test_device_tier_update_issues_no_host_sync(tmp_path, clip):
    """A device-tier unit's AdamW is queued without a host sync: a step count made by a blocking copy would
    stall backward (eager: DeviceUpdater.update_resident as its gradients land, Note [device-tier update at
    landing]) or step() (clipped: UnitOptimizer.update_device) once per unit. Eager keeps no fp32 gradient
    buffer on the device for the unit; clipped keeps one for the update at step()."""
    import offload
    from conftest import tier_kwargs
    model = make_gpt()
    kw = dict(tier_kwargs(model, "device", tmp_path), gpu_memory=ROOMY_GPU)
    # activations="keep": with "auto" the states stay on the host where the CPU AdamW hides under backward
    # (it does on a model this small), and this test needs a unit whose states moved onto the device.
    with offload.engine(copy.deepcopy(model), optimizer=offload.AdamW(**GPU_HP), device="cuda", dtype=BF16,
                        activations="keep", clip_grad_norm=clip, **kw) as eng:
        train_engine(eng, token_batches(1), device="cuda")
        u = next((u for u in eng.units if u.trainable and u.plan.states_home == "gpu"), None)
        assert u is not None, eng.plan.notes
        assert (u.st.dgrad is None) == (clip is None)
        u.st.has_grad = [True] * len(u.st.has_grad)
        grad = torch.randn(u.numel_train, dtype=BF16, device="cuda")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            if clip is None:
                eng._update_on_device(u, grad)
            else:
                eng.unit_opt.update_device(u, eng.optimizer.hyper(), 1.0)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        eng._device_updated.clear()


def test_nonfinite_gradients_skip_device_tier_updates_at_landing(tmp_path):
    """Eager mode updates device-tier units as their gradients land (Note [device-tier update at landing]).
    A step whose loss is inf has non-finite gradients in every unit, so the fused kernel's flag leaves every
    update undone, step() takes the step counts back, and training follows a reference that skipped it."""
    model, batches = make_gpt(), token_batches(4)
    ref = run_reference(model, batches, hp=GPU_HP, device="cuda", autocast_dtype=BF16, skip=(2,))
    import offload
    from conftest import tier_kwargs
    # activations="keep" and room: the states move onto the device after step 0 (see the test above)
    kw = dict(tier_kwargs(model, "device", tmp_path), gpu_memory=ROOMY_GPU)
    with offload.engine(copy.deepcopy(model), optimizer=offload.AdamW(**GPU_HP), device="cuda", dtype=BF16,
                        activations="keep", **kw) as eng:
        with pytest.warns(RuntimeWarning, match="non-finite gradient"):
            got = train_engine(eng, batches, poison=(2,), device="cuda")
        on_device = [u for u in eng.units if u.trainable and u.plan.states_home == "gpu"]
        assert on_device and all(u.st.dgrad is None for u in on_device), eng.plan.notes
    assert got.stepped == ref.stepped == [True, True, False, True]
    assert_bf16_close(got, ref, model)


# ------------------------------------------------------------ device states after the first step

@pytest.mark.parametrize("safety, moved", [(None, "all"), (0.999, "none")])
def test_device_states_move_after_the_first_step_as_far_as_room_allows(tmp_path, monkeypatch, safety, moved):
    """Note [device states after the first step]: the states planned for the device start in host memory;
    after the first step they move there when the measured peak leaves room (all, with a roomy budget), and
    stay CPU-state units otherwise (no room: the safety margin takes the whole budget). Training equals the
    reference either way, and the plan's bytes say where the states are."""
    from offload import act_auto
    from conftest import tier_kwargs
    import offload
    if safety is not None:
        monkeypatch.setattr(act_auto, "AUTO_SAFETY", safety)
    model, batches = make_gpt(), token_batches(STEPS)
    ref = run_reference(model, batches, hp=GPU_HP, device="cuda", autocast_dtype=BF16)
    kw = dict(tier_kwargs(model, "device", tmp_path), gpu_memory=ROOMY_GPU)
    with offload.engine(copy.deepcopy(model), optimizer=offload.AdamW(**GPU_HP), device="cuda", dtype=BF16,
                        activations="keep", **kw) as eng:
        held = [u for u in eng.units if u.plan.promote]
        assert held and all(u.plan.states_home == "cpu" and u.st.master.device.type == "cpu" for u in held)
        assert "gpu*" in str(eng.plan)
        gpu_before = eng.plan.bytes["gpu"]
        got = train_engine(eng, batches, device="cuda")
        assert not any(u.plan.promote for u in eng.units)
        on_device = [u for u in held if u.plan.states_home == "gpu"]
        assert len(on_device) == (len(held) if moved == "all" else 0), eng.plan.notes
        # no fp32 gradient buffer: updated as the gradients land (Note [device-tier update at landing])
        assert all(u.st.master.device.type == "cuda" and u.st.dgrad is None for u in on_device)
        assert all(u.st.master.device.type == "cpu" for u in held if u not in on_device)
        assert eng.plan.bytes["gpu"] == gpu_before + sum(u.shard.train * 12 for u in on_device)
        assert any(n.startswith("after the first step") for n in eng.plan.notes), eng.plan.notes
    assert_bf16_close(got, ref, model)


@pytest.mark.parametrize("share", [0.0, 1.0], ids=["cpu-adamw", "device-side-adamw"])
def test_arena_states_follow_onto_the_device_where_room_is_left(monkeypatch, share):
    """Note [device states after the first step]: where the first step's peak leaves room (here: what two
    units' states need; activations kept, so no backward time is measured that the CPU AdamW could hide
    under), arena units whose parameters are resident follow onto the device, first used first,
    whether the CPU AdamW or the device-side AdamW updated them; a unit whose states the overrides fix to
    the host stays there. Training equals the reference."""
    from offload import act_auto
    model, batches = make_gpt(), token_batches(STEPS)
    ref = run_reference(model, batches, hp=GPU_HP, device="cuda", autocast_dtype=BF16)
    room = {}
    monkeypatch.setattr(act_auto, "device_room", lambda budget, device: room["bytes"])
    fixed = "blocks.0"   # units are named by their module; the first block's states stay on the host
    with _device_update_engine(copy.deepcopy(model), share, monkeypatch, activations="keep",
                               overrides={"units": {fixed: {"states": "cpu"}}}) as eng:
        assert not any(u.plan.promote for u in eng.units), str(eng.plan)
        cands = eng._arena_candidates()
        assert len(cands) >= 3 and fixed not in [u.name for u in cands], [u.name for u in cands]
        assert [u.index for u in cands] == sorted(u.index for u in cands)
        was = {u.name: u.plan.update_on for u in cands}
        room["bytes"] = sum(eng._device_state_bytes(u) for u in cands[:2])
        got = train_engine(eng, batches, device="cuda")
        moved = [u for u in eng.units if u.plan.states_home == "gpu"]
        assert moved == cands[:2], (eng.plan.notes, [u.name for u in moved])
        assert {was[u.name] for u in moved} == {"device" if share else "host"}
        assert all(u.st.master.device.type == "cuda" and u.plan.update_on == "host" for u in moved)
        assert all(u.st.master.device.type == "cpu" for u in eng.units if u.trainable and u not in moved)
        assert any("arena units follow" in n for n in eng.plan.notes), eng.plan.notes
    assert_bf16_close(got, ref, model)
