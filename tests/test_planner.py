"""The planner's arithmetic, checked against numbers worked out by hand, and `offload plan` / `offload probe`
as a user runs them (no GPU, no weights)."""
import json
import os
import subprocess
import sys
import time

import pytest

from offload import cli
from offload import plan as planmod
from offload.groups import split_units
from offload.model_config import build_meta_model, load_config, model_shape
from offload.probe import PROFILE_KEYS
from offload.overrides import Overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 2, "n_positions": 32, "vocab_size": 128,
        "tie_word_embeddings": True,
        "bos_token_id": 0, "eos_token_id": 0}
# Hand count of TINY (every tensor is a multiple of the 64-element alignment already):
# a block: ln_1 64+64, c_attn 64*192+192, attn c_proj 64*64+64, ln_2 64+64, c_fc 64*256+256, mlp c_proj 256*64+64
BLOCK = 64 + 64 + 12288 + 192 + 4096 + 64 + 64 + 64 + 16384 + 256 + 16384 + 64      # 49,984
BLOCK_PADDED = 25 * 2048                                                              # 51,200
EMB = 128 * 64 + 32 * 64          # wte (tied to lm_head) + wpe, gathered into one unit: 10,240 = 5 * 2048
LN_F_PADDED = 2048                # ln_f 128 elements, padded to 4 KiB of bf16
PADDED = EMB + 2 * BLOCK_PADDED + LN_F_PADDED                                         # 114,688
PARAMS = 2 * BLOCK + EMB + 128                                                        # 110,336
PROFILE = {"gpu_tflops": 100.0, "pcie_gb_s": 10.0, "disk_read_gb_s": 4.0, "disk_write_gb_s": 2.0,
           "cpu_adam_gparams_s": 0.5}


@pytest.fixture(scope="module")
def tiny():
    model = build_meta_model(load_config(_write_config(TINY)))
    units = split_units(model)
    return units, model_shape(model, units, seq=32)


def _write_config(cfg, folder=None):
    import tempfile
    folder = folder or tempfile.mkdtemp()
    path = os.path.join(folder, "config.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


def _plan(units, gpu, cpu, nvme=None, act_reserve=0):
    return planmod.plan_placement(units, itemsize=2, device="cuda", gpu_budget=gpu, cpu_budget=cpu, nvme=nvme,
                                  grad_accum=1, activations="auto", act_reserve=act_reserve)


def test_tiny_config_shape_is_counted_by_hand(tiny):
    units, shape = tiny
    assert [u.numel for u in units] == [EMB, BLOCK_PADDED, BLOCK_PADDED, LN_F_PADDED]
    assert shape.params == PARAMS and shape.compute_params == PARAMS   # tied: the head's matmul uses wte
    assert shape.block_params == 2 * BLOCK
    assert (shape.layers, shape.hidden, shape.heads, shape.vocab, shape.seq) == (2, 64, 2, 128, 32)


def test_all_on_gpu_bytes_are_2_plus_12_per_element(tiny):
    units, _ = tiny
    p = _plan(units, gpu=1 << 30, cpu=1 << 30)
    assert p.bytes == {"gpu": PADDED * 2 + PADDED * 12, "cpu": 0, "nvme": 0}


def test_states_on_cpu_when_only_params_fit(tiny):
    units, _ = tiny
    p = _plan(units, gpu=PADDED * 2 + 4096, cpu=1 << 30)
    assert p.bytes == {"gpu": PADDED * 2, "cpu": PADDED * 12, "nvme": 0}
    # one host gradient buffer per unit (the AdamW output is written over it), 4 KiB aligned (already: numel
    # is a multiple of 2048)
    assert p.buffers["cpu_grads"] == PADDED * 2


def test_states_on_nvme_when_cpu_is_short(tiny):
    units, _ = tiny
    p = _plan(units, gpu=PADDED * 2 + 4096, cpu=PADDED * 2 + 2 * BLOCK_PADDED * 12, nvme=["/nvme"])
    assert p.bytes["gpu"] == PADDED * 2
    assert p.bytes["cpu"] + p.bytes["nvme"] == PADDED * 12 and p.bytes["nvme"] > 0


def test_predicted_times_are_bytes_over_rates(tiny):
    units, shape = tiny
    p = _plan(units, gpu=PADDED * 2 + 4096, cpu=1 << 30)
    tokens = 2 * 32
    pred = p.predict(tokens, PROFILE, shape)
    flops = 6 * PARAMS * tokens + 12 * 2 * 64 * 32 * tokens        # 6NT + attention 12*L*h*s*T
    assert pred.model_flops == pred.hardware_flops == flops        # no recompute: nothing counted twice
    assert pred.resource_s["gpu"] == pytest.approx(flops / (100e12 * planmod.COMPUTE_EFFICIENCY))
    # every unit's optimizer runs on the CPU: bf16 gradients out, updated bf16 params back in
    assert pred.resource_s["pcie"] == pytest.approx(2 * PADDED * 2 / 10e9)
    # AdamW's 28 B per element and the optimizer's copies share host memory, at AdamW's own bandwidth
    assert pred.resource_s["cpu_adam"] == pytest.approx((PADDED * 28 + 2 * PADDED * 2) / (0.5e9 * 28))
    assert pred.resource_s["disk"] == 0
    # the last unit (ln_f) is host-updated: the CPU starts after the forward (a third of 6NT + attention) and
    # ln_f's share of backward (its elements over the matmul parameters)
    fwd = flops / 3
    share = (fwd + LN_F_PADDED / PARAMS * (flops - fwd)) / flops
    assert pred.cpu_start_s == pytest.approx(pred.resource_s["gpu"] * share)
    assert p.predicted_step_s == pytest.approx(max(max(pred.resource_s.values()),
                                                   pred.cpu_start_s + pred.resource_s["cpu_adam"]))
    assert p.bottleneck == pred.bottleneck


def test_states_on_their_way_to_the_device_cost_no_link_traffic(tiny):
    """Note [device states after the first step]: a unit marked to move its states onto the device (promote)
    is priced where it is headed, whether the CPU AdamW or the device-side AdamW updated it until then, so
    the activation plan made between the choice and the move sees the link as it will be."""
    units, _ = tiny
    p = _plan(units, gpu=PADDED * 2 + 4096, cpu=1 << 30)
    full = planmod.state_traffic_bytes(units, p.units, 2)
    for p_unit, upd in zip(p.units[1:3], ("host", "device")):
        p_unit.update_on, p_unit.promote = upd, True
    moving = planmod.state_traffic_bytes(units, p.units, 2)
    assert moving["pcie"] == full["pcie"] - 2 * 2 * 2 * BLOCK_PADDED   # two blocks' gradients out, params in
    assert moving["adam_elems"] == full["adam_elems"] - 2 * BLOCK_PADDED


def test_disk_time_adds_reads_and_writes(tiny):
    units, shape = tiny
    p = _plan(units, gpu=PADDED * 2 + 4096, cpu=PADDED * 2 + 2 * BLOCK_PADDED * 12, nvme=["/nvme"])
    nv = p.bytes["nvme"]                                           # states only: read once, written once
    pred = p.predict(64, PROFILE, shape)
    assert pred.resource_s["disk"] == pytest.approx(nv / 4e9 + nv / 2e9)


@pytest.mark.parametrize("mixed, expect", [(2.5, 2 / 2.5), (1.0, 2.0), (100.0, 1 / 2)])
def test_disk_time_with_reads_and_writes_at_once(mixed, expect):
    """With the rate of both at once measured, a step's reads and writes take their bytes together at that
    rate, and never less than the slower kind alone: 1 GB each way at 4 GB/s read, 2 GB/s write."""
    r = dict(PROFILE, disk_mixed_gb_s=mixed)
    assert planmod.disk_seconds(1e9, 1e9, r) == pytest.approx(expect)
    assert planmod.disk_seconds(1e9, 1e9, PROFILE) == pytest.approx(1 / 4 + 1 / 2)
    # an uneven mix: the 1 GB that pairs with the writes at the mixed rate, the other 2 GB of reads alone
    assert planmod.disk_seconds(3e9, 1e9, r) == pytest.approx(max(2 / mixed + 2 / 4, 3 / 4, 1 / 2))
    assert planmod.disk_seconds(1e9, 0, r) == pytest.approx(1 / 4)      # reads only: the read rate


def test_recompute_adds_one_forward(tiny):
    _, shape = tiny
    model, hw = planmod.training_flops(shape, 100, recompute=True)
    assert hw - model == 2 * 2 * BLOCK * 100 + 4 * 2 * 64 * 32 * 100


def test_batch_is_fitted_into_the_engines_activation_reserve(tiny):
    units, shape = tiny
    opts = planmod.activation_options(shape, 4, 2)
    assert [a.policy for a in opts] == ["keep", "recompute", "recompute+offload"]
    tok = 4 * 32
    assert opts[0].device_bytes == 2 * 34 * tok * 64 + tok * 128 * (2 + planmod.LOGIT_EXTRA_BYTES)
    kw = dict(itemsize=2, device="cuda", cpu_budget=1 << 30, nvme=None, grad_accum=1, activations="auto",
              eager=False)    # clipping: no device-side AdamW, so the reserve is ACTIVATION_SHARE exactly
    # the engine keeps 40% of gpu_memory for activations: keep fits a budget of 2.5x its reserve, not less
    budget = int(opts[0].device_bytes / planmod.ACTIVATION_SHARE) + 1
    p, act = planmod.plan_for_batch(units, shape, 4, gpu_budget=budget, **kw)
    assert act.policy == "keep" and p.act_reserve == int(budget * planmod.ACTIVATION_SHARE)
    p, act = planmod.plan_for_batch(units, shape, 4, gpu_budget=budget - 10, **kw)
    assert act.policy == "recompute"
    # priced: a slow GPU makes recompute's extra forward cost more than anything else, so keep wins; the
    # placement is the engine's whatever the batch
    slow_gpu = dict(PROFILE, gpu_tflops=1e-3)
    p2, act = planmod.plan_for_batch(units, shape, 4, rates=slow_gpu, gpu_budget=budget, **kw)
    assert act.policy == "keep"
    # (on so slow a GPU the CPU AdamW hides under backward, so the states the engine defers for the first
    # step stay in host memory after it: test_plan_keeps_states_on_the_host_where_the_engine_would...)
    eng = planmod.engine_placement(units, gpu_budget=budget, rates=slow_gpu, **kw)
    assert [(u.params_home, u.states_home) for u in p2.units] == [
        (u.params_home, "cpu" if u.promote else u.states_target) for u in eng.units]
    # a batch the default reserve cannot hold: the plan keeps more of the device for activations (less
    # model state there), says which override gets it, and the engine's placement with it is the same
    short = int(opts[2].device_bytes / planmod.ACTIVATION_SHARE) - 10
    p, act = planmod.plan_for_batch(units, shape, 4, gpu_budget=short, **kw)
    share = p.batch_overrides["activation_share"]
    assert share > planmod.ACTIVATION_SHARE and p.act_reserve >= act.device_bytes
    assert round(share / planmod.SHARE_STEP, 6) % 1 == 0 and share <= planmod.MAX_ACTIVATION_SHARE
    assert any(f"'activation_share': {share}" in n and f"activations={act.policy!r}" in n for n in p.notes)
    again = planmod.engine_placement(units, gpu_budget=short, rates=planmod.DEFAULT_RATES, defer=False,
                                     overrides=Overrides(activation_share=share), **kw)
    assert [(u.params_home, u.states_home) for u in again.units] == [(u.params_home, u.states_home) for u in p.units]
    # ... the smallest such share: one step less does not fit
    smaller = planmod.engine_placement(units, gpu_budget=short, rates=planmod.DEFAULT_RATES, defer=False,
                                       overrides=Overrides(activation_share=share - planmod.SHARE_STEP), **kw)
    assert smaller.act_reserve < min(a.device_bytes for a in opts)
    # an override of the share is the user's: nothing is raised over it
    with pytest.raises(planmod.BudgetError, match="activation_share=0.4 keeps for them"):
        planmod.plan_for_batch(units, shape, 4, gpu_budget=short, overrides=Overrides(activation_share=0.4), **kw)
    # a batch that needs between 90% and 95% of the device: refused, not planned at 95%
    for frac in (0.91, 0.93, 0.945):
        with pytest.raises(planmod.BudgetError, match="no larger share up to 90%"):
            planmod.plan_for_batch(units, shape, 4, gpu_budget=int(opts[2].device_bytes / frac), **kw)
    too_small = int(opts[2].device_bytes / planmod.MAX_ACTIVATION_SHARE) - 10
    with pytest.raises(planmod.BudgetError, match="no larger share up to 90%"):
        planmod.plan_for_batch(units, shape, 4, gpu_budget=too_small, **kw)
    # between recompute's reserve and recompute+offload's: the block inputs go to host memory, which the CPU
    # budget must hold beside the arena
    # (priced as a deep model, where the block inputs kept on the device outweigh one block's activations)
    import dataclasses
    deep = dataclasses.replace(shape, layers=200)
    opts = planmod.activation_options(deep, 4, 2)
    offload_only = int(opts[2].device_bytes / planmod.ACTIVATION_SHARE) + 10
    assert opts[1].device_bytes > offload_only * planmod.ACTIVATION_SHARE
    p, act = planmod.plan_for_batch(units, deep, 4, gpu_budget=offload_only, **kw)
    assert act.policy == "recompute+offload" and act.host_bytes == deep.layers * 4 * 32 * 64 * 2
    tight_host = dict(kw, cpu_budget=p.arena_bytes + act.host_bytes - 1)
    with pytest.raises(planmod.BudgetError, match="block inputs need .* in host memory"):
        planmod.plan_for_batch(units, deep, 4, gpu_budget=offload_only, **tight_host)


def test_block_inputs_get_host_room_from_states_moved_to_the_disk(tmp_path):
    """Where only recompute with block inputs in host memory fits the device and the arena leaves those
    inputs too little host memory, a plan with a disk keeps that much of cpu_memory free of optimizer state
    (more states on the disk); its note names the override (activation_host_bytes) that makes the engine
    place the same way, its arena included (the engine's defers device states into it)."""
    import dataclasses
    model = build_meta_model(load_config(_write_config(dict(TINY, n_embd=256, n_layer=8, n_head=4))))
    units = split_units(model)
    deep = dataclasses.replace(model_shape(model, units, seq=32), layers=200)   # inputs outweigh one block
    opts = planmod.activation_options(deep, 64, 2)
    gpu = int(opts[2].device_bytes / planmod.ACTIVATION_SHARE) + 10
    kw = dict(itemsize=2, device="cuda", nvme=None, grad_accum=1, activations="auto", eager=False)
    full = planmod.engine_placement(units, gpu_budget=gpu, cpu_budget=1 << 30, rates=planmod.DEFAULT_RATES,
                                    defer=False, **kw)
    cpu = full.arena_bytes + opts[2].host_room - 1           # the whole model's states leave 1 B too little
    with pytest.raises(planmod.BudgetError, match="in host memory"):
        planmod.plan_for_batch(units, deep, 64, gpu_budget=gpu, cpu_budget=cpu, **kw)
    kw["nvme"] = [str(tmp_path)]
    p, act = planmod.plan_for_batch(units, deep, 64, gpu_budget=gpu, cpu_budget=cpu, **kw)
    hold = p.batch_overrides["activation_host_bytes"]
    assert act.policy == "recompute+offload" and hold == act.host_room == act.host_pinned >= act.host_bytes
    assert p.budgets["cpu"] == cpu and p.arena_bytes + hold <= cpu and p.bytes["nvme"] > 0
    assert any(f"'activation_host_bytes': {hold}" in n for n in p.notes)
    same = planmod.engine_placement(units, gpu_budget=gpu, cpu_budget=cpu, rates=planmod.DEFAULT_RATES,
                                    overrides=Overrides(activation_host_bytes=hold), **kw)   # defer=True: the engine's
    assert same.budgets["cpu"] == cpu and same.arena_bytes + hold <= cpu
    assert [(u.params_home, u.states_target) for u in same.units] == [(u.params_home, u.states_home) for u in p.units]


def test_engine_placement_reserves_activations_then_staging_then_assigns_update_sites(tiny):
    from offload.device_update import chunk_elems, staging_bytes
    units, _ = tiny
    gpu = 4 << 20      # 1.6 MiB reserve, 1.6 MiB staging: params fit, some states do not
    kw = dict(itemsize=2, device="cuda", gpu_budget=gpu, cpu_budget=1 << 30, nvme=None, grad_accum=1,
              activations="auto")
    slow_cpu = dict(PROFILE, pcie_h2d_gb_s=10.0, pcie_d2h_gb_s=10.0, cpu_adam_gparams_s=0.1)
    p = planmod.engine_placement(units, rates=slow_cpu, **kw)
    reserve = int(gpu * planmod.ACTIVATION_SHARE)
    staging = staging_bytes(chunk_elems(max(u.numel_train for u in units)))
    ref = planmod.plan_placement(units, act_reserve=reserve + staging, **kw)
    assert p.act_reserve == reserve
    assert [(u.params_home, u.states_target) for u in p.units] == [(u.params_home, u.states_home) for u in ref.units]
    planmod.assign_update_sites(ref, slow_cpu, gpu_room=staging)
    assert [u.update_on for u in p.units] == [u.update_on for u in ref.units]
    assert any(u.update_on == "device" for u in p.units)
    # clipping or accumulation: no device-side AdamW and no staging room
    for extra in (dict(eager=False), dict(grad_accum=2)):
        q = planmod.engine_placement(units, rates=slow_cpu, **dict(kw, **extra))
        assert all(u.update_on == "host" for u in q.units)
        assert "gpu_adamw_staging" not in q.buffers
    # the CPU: no activation reserve, no device-side AdamW unless a test forces a share
    c = planmod.engine_placement(units, rates=slow_cpu, **dict(kw, device="cpu"))
    assert c.act_reserve == 0 and all(u.update_on == "host" for u in c.units)


def test_device_states_start_in_host_memory_where_it_has_room(tiny):
    """Note [device states after the first step]: on CUDA the states placed on the device start in the arena
    (marked promote, shown as gpu*), their bytes and host gradient buffers counted there; a CPU budget without
    room for them keeps them on the device from the start; the CPU and several ranks never defer."""
    units, _ = tiny
    kw = dict(itemsize=2, device="cuda", gpu_budget=64 << 20, nvme=None, grad_accum=1, activations="auto",
              eager=False, rates=PROFILE)
    at_once = planmod.plan_placement(units, act_reserve=int((64 << 20) * planmod.ACTIVATION_SHARE),
                                     **{k: v for k, v in kw.items() if k not in ("eager", "rates")}, cpu_budget=1 << 30)
    on_gpu = [u for u in at_once.units if u.states_home == "gpu"]
    assert on_gpu and all(u.params_home == "gpu" for u in at_once.units)
    p = planmod.engine_placement(units, cpu_budget=1 << 30, **kw)
    moved = sum(u.numel_train * planmod.STATE_BYTES for u in on_gpu)
    assert [u.name for u in p.units if u.promote] == [u.name for u in on_gpu]
    assert all(u.states_home == "cpu" and u.states_target == "gpu" for u in p.units if u.promote)
    assert p.bytes["gpu"] == at_once.bytes["gpu"] - moved and p.bytes["cpu"] == at_once.bytes["cpu"] + moved
    assert p.buffers["cpu_arena"] >= at_once.buffers["cpu_arena"] + moved
    assert "gpu*" in str(p) and "first step" in p.notes[-1]
    assert p.predicted_step_s == pytest.approx(at_once.predicted_step_s)   # priced where they are headed
    tight = planmod.engine_placement(units, cpu_budget=p.buffers["cpu_arena"] - 1, **kw)
    assert not any(u.promote for u in tight.units) and tight.bytes == at_once.bytes
    cpu = planmod.engine_placement(units, cpu_budget=1 << 30, **dict(kw, device="cpu"))
    ranks = planmod.engine_placement(units, cpu_budget=1 << 30, sharded=True, **kw)
    assert not any(u.promote for u in cpu.units + ranks.units)


def test_activation_reserve_shrinks_for_a_working_set_that_needs_more():
    """Blocks so large that the smallest streaming working set does not fit beside 40% for activations (175B
    on 24 GiB): the reserve becomes what that working set leaves, down to MIN_ACTIVATION_SHARE, and the plan
    says so; below that the budget is refused."""
    units = split_units(build_meta_model(load_config(_write_config(dict(TINY, n_layer=24)))))
    ws = planmod.stream_working_set(units, 2, 1)
    assert ws < 2 * sum(u.numel for u in units)    # so the params must stream
    kw = dict(itemsize=2, device="cuda", cpu_budget=1 << 30, nvme=None, grad_accum=1, activations="auto",
              eager=False, rates=PROFILE)
    budget = int(ws / (1 - planmod.ACTIVATION_SHARE)) - 1024   # 40% would leave less than the working set
    p = planmod.engine_placement(units, gpu_budget=budget, **kw)
    assert p.act_reserve == budget - ws and p.act_reserve < int(budget * planmod.ACTIVATION_SHARE)
    assert p.buffers["gpu_stream"] == ws and "not 40%" in p.notes[-1]
    with pytest.raises(planmod.BudgetError, match="streaming working set"):
        planmod.engine_placement(units, gpu_budget=int(ws / (1 - planmod.MIN_ACTIVATION_SHARE)) - 1024, **kw)
    roomy = planmod.engine_placement(units, gpu_budget=4 * ws, **kw)
    assert roomy.act_reserve == int(4 * ws * planmod.ACTIVATION_SHARE)


def _reference_shape():
    """The 3.37B reference model on the meta device, split as the engine splits it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                      num_key_value_heads=24, vocab_size=32000, max_position_embeddings=2048,
                      tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    units = split_units(model)
    return units, model_shape(model, units, 2048)


@pytest.mark.parametrize("eager, rates, measured", [
    # h200-ref-1 (bench/results.jsonl): every arena-state AdamW on the CPU (that commit had no device-side AdamW)
    (False, dict(gpu_tflops=802.35, pcie_h2d_gb_s=55.34, pcie_d2h_gb_s=55.25, pcie_gb_s=110.6,
                 cpu_adam_gparams_s=4.65), 0.8432),
    # h200-ref-2: part of it on the GPU, the share assign_update_sites balances
    (True, dict(gpu_tflops=791.05, pcie_h2d_gb_s=55.06, pcie_d2h_gb_s=55.19, pcie_gb_s=110.2,
                cpu_adam_gparams_s=4.51), 0.7445)])
def test_step_model_reproduces_the_h200_reference_runs(eager, rates, measured):
    """Note [step-time model]: the two offload measurements within 15%, with COMPUTE_EFFICIENCY taken from
    the third (the GPU-resident run) and nothing fitted to these two."""
    units, shape = _reference_shape()
    p, act = planmod.plan_for_batch(units, shape, 4, rates=rates, itemsize=2, device="cuda", gpu_budget=24 << 30,
                                    cpu_budget=100 << 30, nvme=None, grad_accum=1, activations="auto", eager=eager)
    assert act.policy == "recompute"
    assert p.bytes["gpu"] == (13171785728 if not eager else 11992088576)    # the plan_bytes those runs recorded
    pred = p.predict(4 * 2048, rates, shape, act)
    assert pred.bottleneck == "cpu_adam"
    assert abs(pred.step_s / measured - 1) < 0.15
    # the GPU-resident run took 0.584 s for this compute: the efficiency reproduces it
    assert pred.resource_s["gpu"] * rates["gpu_tflops"] / 791.05 == pytest.approx(0.584, rel=0.02)


def test_cli_plans_a_config_without_weights(tmp_path, capsys):
    _write_config(TINY, str(tmp_path))
    prof = tmp_path / "m.json"
    prof.write_text(json.dumps(PROFILE))
    rc = cli.main(["plan", "--model", str(tmp_path), "--gpu-memory", "1GiB", "--cpu-memory", "1GiB",
                   "--machine", str(prof), "--batch", "2", "--seq", "32"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "predicted step" in out and "bound by" in out and "cpu_adam" in out


@pytest.mark.parametrize("case", ["missing", "not_config", "not_json"])
def test_cli_bad_input_is_one_line(tmp_path, capsys, case):
    path = tmp_path / "config.json"
    if case == "not_config":
        path.write_text('{"hello": 1}')
    elif case == "not_json":
        path.write_text("weights? no")
    rc = cli.main(["plan", "--model", str(path), "--gpu-memory", "1GiB", "--cpu-memory", "1GiB"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("offload: error: --model") and err.count("\n") == 1


def test_impossible_budget_exits_nonzero_with_one_line(tmp_path):
    cfg = _write_config(TINY, str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "offload", "plan", "--model", cfg, "--gpu-memory", "64KiB",
                        "--cpu-memory", "64KiB"], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("offload: error: ") and "raise" in lines[0]


def test_probe_quick_writes_documented_keys(tmp_path, capsys):
    out = tmp_path / "machine.json"
    disk = tmp_path / "disk"
    disk.mkdir()
    t0 = time.perf_counter()
    assert cli.main(["probe", "--quick", "--nvme", str(disk), "-o", str(out)]) == 0
    assert time.perf_counter() - t0 < 30
    prof = json.loads(out.read_text())
    assert set(prof) == set(PROFILE_KEYS)
    for k in ("mem_bw_gb_s", "cpu_adam_gparams_s", "torch_adam_gparams_s", "disk_read_gb_s", "disk_write_gb_s",
              "disk_gb_s", "disk_mixed_gb_s", "cpu_memory_bytes"):
        assert prof[k] > 0, k
    assert prof["nvme_paths"] == [str(disk)]
    assert 0 < prof["probe_s"] < 30
    assert os.listdir(disk) == []                  # the probe file is removed
    import torch
    if not torch.cuda.is_available():
        assert all(prof[k] is None for k in ("pcie_gb_s", "gpu_tflops", "gpu_memory_bytes"))
    printed = capsys.readouterr().out
    assert "qd 32" in printed and "reads and writes at once" in printed


@pytest.mark.parametrize("share, clip", [(None, None), (0.5, None), (0.5, 1.0)])
def test_cli_plan_is_the_plan_the_engine_builds(tmp_path, monkeypatch, share, clip):
    """`offload plan` and offload.engine() place through the same function: for the same model and budgets
    every unit gets the same homes and the same AdamW site (a forced device share exercises update_on on
    the CPU; clipping turns it off in both)."""
    import argparse
    import torch
    from transformers import LlamaForCausalLM
    import offload
    from offload.presets import preset_config
    from offload.weights import RandomInit
    monkeypatch.setattr(planmod, "DEVICE_UPDATE_SHARE", share)
    config = preset_config("tiny", max_seq=64)
    folder = tmp_path / "model"
    folder.mkdir()
    config.to_json_file(str(folder / "config.json"))
    nvme = tmp_path / "nvme"
    nvme.mkdir()
    gpu, cpu = 9_000_000, 24_000_000   # bytes: params resident, states on all three tiers
    args = argparse.Namespace(model=str(folder), gpu_memory=str(gpu), cpu_memory=str(cpu), nvme=[str(nvme)],
                              machine=None, batch=None, seq=None, dtype="fp32", grad_accum=1, clip=clip,
                              device="cpu", ranks=1)
    cli_plan = cli.plan_from_args(args)[0]
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    with offload.engine(model, device="cpu", gpu_memory=gpu, cpu_memory=cpu, nvme=[str(nvme)], clip_grad_norm=clip,
                        weights=RandomInit()) as eng:
        engine_plan = eng.plan
    homes = lambda p: [(u.name, u.params_home, u.states_home, u.update_on) for u in p.units]
    assert homes(cli_plan) == homes(engine_plan)
    assert cli_plan.bytes == engine_plan.bytes and cli_plan.buffers == engine_plan.buffers
    assert {u.states_home for u in cli_plan.units} == {"gpu", "cpu", "nvme"}
    assert any(u.update_on == "device" for u in cli_plan.units) == (share is not None and clip is None)


def test_cli_plan_for_several_ranks_is_one_ranks_share(tmp_path, capsys):
    """--ranks N plans one rank's shard under per-rank budgets, as the engine does under torchrun: the states
    each rank holds are 1/N of the model's (up to each slice's alignment padding)."""
    import argparse
    from offload.presets import preset_config
    config = preset_config("tiny", max_seq=64)
    config.to_json_file(str(tmp_path / "config.json"))
    plans = {}
    for ranks in (1, 2, 3):
        args = argparse.Namespace(model=str(tmp_path / "config.json"), gpu_memory="8MiB", cpu_memory="1GiB",
                                  nvme=None, machine=None, batch=None, seq=None, dtype="fp32", grad_accum=1,
                                  clip=None, device="cpu", ranks=ranks)
        plans[ranks] = cli.plan_from_args(args)[0]
    states = {r: sum(u.numel_train // u.shards for u in p.units) for r, p in plans.items()}
    for r in (2, 3):
        assert states[1] / r <= states[r] <= states[1] / r * 1.02, (r, states)   # padding: aligned slices
    assert cli.main(["plan", "--model", str(tmp_path / "config.json"), "--gpu-memory", "8MiB", "--cpu-memory",
                     "1GiB", "--device", "cpu", "--ranks", "2"]) == 0
    assert "2 ranks" in capsys.readouterr().out


def test_placement_without_device_adamw_is_priced_at_the_given_rates(tiny):
    """Clipping (or LoRA, or accumulation) leaves AdamW on the CPU; the plan's prediction must still use this
    machine's rates, not the planner's defaults."""
    units, _ = tiny
    streamed = int(planmod.stream_working_set(units, 2) / (1 - planmod.ACTIVATION_SHARE)) + 1024
    kw = dict(itemsize=2, device="cuda", gpu_budget=streamed, cpu_budget=1 << 30, nvme=None, grad_accum=1,
              activations="auto", eager=False)
    slow = planmod.engine_placement(units, rates=dict(PROFILE, pcie_gb_s=1.0, pcie_h2d_gb_s=1.0,
                                                        pcie_d2h_gb_s=1.0), **kw)
    fast = planmod.engine_placement(units, rates=dict(PROFILE, pcie_gb_s=100.0, pcie_h2d_gb_s=100.0,
                                                        pcie_d2h_gb_s=100.0), **kw)
    assert slow.resource_s["pcie"] > 50 * fast.resource_s["pcie"] > 0


def test_plan_keeps_states_on_the_host_where_the_engine_would_after_its_first_step(tiny):
    """With activations "auto" the engine moves the states it deferred for the first step onto the device only
    while the CPU AdamW of what stays on the host would not hide under backward (engine._plan_promotion);
    plan_for_batch shows the placement a run holds from then on. A slow GPU (long backward): every deferred
    unit stays on the host. A fast one: all move, and the plan is the steady state offload plan showed before."""
    units, shape = tiny
    kw = dict(itemsize=2, device="cuda", gpu_budget=64 << 20, cpu_budget=1 << 30, nvme=None, grad_accum=1,
              activations="auto", eager=False)
    deferred = [p.name for p in planmod.engine_placement(units, rates=PROFILE, **kw).units if p.promote]
    assert deferred                       # the budget puts states on the device, deferred for the first step
    slow = dict(PROFILE, gpu_tflops=1e-6, cpu_adam_gparams_s=1.0)
    p, act = planmod.plan_for_batch(units, shape, 4, rates=slow, **kw)
    homes = {u.name: u.states_home for u in p.units}
    assert all(homes[n] == "cpu" for n in deferred) and not any(u.promote for u in p.units)
    assert any(f"keeps the states of {len(deferred)} of the {len(deferred)} units" in n for n in p.notes)
    fast = dict(PROFILE, gpu_tflops=1e6, cpu_adam_gparams_s=1e-3)
    p, act = planmod.plan_for_batch(units, shape, 4, rates=fast, **kw)
    assert all(u.states_home == "gpu" for u in p.units if u.name in deferred)
    assert not any("after the first step" in n for n in p.notes)
