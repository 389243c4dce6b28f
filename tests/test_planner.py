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
    # host gradient + AdamW output buffer per unit, each 4 KiB aligned (already: numel is a multiple of 2048)
    assert p.buffers["cpu_grads"] == 2 * PADDED * 2


def test_states_on_nvme_when_cpu_is_short(tiny):
    units, _ = tiny
    p = _plan(units, gpu=PADDED * 2 + 4096, cpu=2 * PADDED * 2 + 2 * BLOCK_PADDED * 12, nvme=["/nvme"])
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
    assert pred.resource_s["cpu_adam"] == pytest.approx(PADDED / 0.5e9)
    assert pred.resource_s["disk"] == 0
    assert p.predicted_step_s == max(pred.resource_s.values()) and p.bottleneck == pred.bottleneck


def test_disk_time_adds_reads_and_writes(tiny):
    units, shape = tiny
    p = _plan(units, gpu=PADDED * 2 + 4096, cpu=2 * PADDED * 2 + 2 * BLOCK_PADDED * 12, nvme=["/nvme"])
    nv = p.bytes["nvme"]                                           # states only: read once, written once
    pred = p.predict(64, PROFILE, shape)
    assert pred.resource_s["disk"] == pytest.approx(nv / 4e9 + nv / 2e9)


def test_recompute_adds_one_forward(tiny):
    _, shape = tiny
    model, hw = planmod.training_flops(shape, 100, recompute=True)
    assert hw - model == 2 * 2 * BLOCK * 100 + 4 * 2 * 64 * 32 * 100


def test_batch_that_does_not_fit_falls_back_to_recompute_then_offload(tiny):
    units, shape = tiny
    opts = planmod.activation_options(shape, 4, 2)
    assert [a.policy for a in opts] == ["keep", "recompute", "recompute+offload"]
    tok = 4 * 32
    assert opts[0].device_bytes == 2 * 34 * tok * 64 + tok * 128 * 10
    budget = PADDED * 18 + opts[1].device_bytes + 4096   # device states cost 16 B/element (fp32 grad too)
    p, act = planmod.plan_for_batch(units, shape, 4, itemsize=2, device="cuda", gpu_budget=budget,
                                    cpu_budget=1 << 30, nvme=None, grad_accum=1, activations="auto")
    assert act.policy == "recompute" and p.bytes["gpu"] == PADDED * 14   # keep would push states to the CPU
    # priced: keep's CPU AdamW (PADDED / 1e3 s) is slower than recompute's extra forward, so recompute again
    slow_cpu = dict(PROFILE, cpu_adam_gparams_s=1e-6)
    _, act = planmod.plan_for_batch(units, shape, 4, rates=slow_cpu, itemsize=2, device="cuda", gpu_budget=budget,
                                    cpu_budget=1 << 30, nvme=None, grad_accum=1, activations="auto")
    assert act.policy == "recompute"
    # a fast CPU makes keep (no recompute, states on the CPU) the faster step
    fast_cpu = dict(PROFILE, cpu_adam_gparams_s=1e6, pcie_gb_s=1e6, gpu_tflops=1e-3)
    _, act = planmod.plan_for_batch(units, shape, 4, rates=fast_cpu, itemsize=2, device="cuda", gpu_budget=budget,
                                    cpu_budget=1 << 30, nvme=None, grad_accum=1, activations="auto")
    assert act.policy == "keep"


def test_offloaded_block_inputs_come_out_of_the_cpu_budget(tiny):
    import dataclasses
    units, shape = tiny
    shape = dataclasses.replace(shape, layers=8)   # deeper, so keeping block inputs costs more than offloading
    opts = planmod.activation_options(shape, 4, 2)
    off = opts[2]
    assert off.policy == "recompute+offload" and off.host_bytes == 8 * 4 * 32 * 64 * 2
    # only recompute+offload fits the device; the CPU holds states and buffers with exactly its inputs to spare
    gpu = PADDED * 2 + 4096 + off.device_bytes
    need = planmod.plan_placement(units, itemsize=2, device="cuda", gpu_budget=gpu, cpu_budget=None, nvme=None,
                                  grad_accum=1, activations="auto", act_reserve=off.device_bytes).arena_bytes
    kw = dict(itemsize=2, device="cuda", gpu_budget=gpu, nvme=None, grad_accum=1, activations="auto")
    p, act = planmod.plan_for_batch(units, shape, 4, cpu_budget=need + off.host_bytes, **kw)
    assert act.policy == "recompute+offload" and p.budgets["cpu"] == need + off.host_bytes
    with pytest.raises(planmod.BudgetError, match="short"):
        planmod.plan_for_batch(units, shape, 4, cpu_budget=need + off.host_bytes - 1, **kw)


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
              "disk_gb_s", "cpu_memory_bytes"):
        assert prof[k] > 0, k
    assert prof["nvme_paths"] == [str(disk)]
    assert os.listdir(disk) == []                  # the probe file is removed
    import torch
    if not torch.cuda.is_available():
        assert all(prof[k] is None for k in ("pcie_gb_s", "gpu_tflops", "gpu_memory_bytes"))
    assert "qd 32" in capsys.readouterr().out
