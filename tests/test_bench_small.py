"""The GPU benchmark scripts run end to end in their small modes (tiny shapes, device cpu), so a script handed
to the GPU machine has at least run here: bench/scale.py, bench/nvme_regime.py, bench/plan_check.py. Their
rows go to a temporary results file (OFFLOAD_BENCH_RESULTS), never to bench/results.jsonl."""
import json
import os
import subprocess
import sys

import pytest

from offload.plan import disk_seconds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a described machine, so that no rate is measured (seconds saved); the disk rate is the H200 machine's
PROFILE = {"gpu_tflops": 0.1, "pcie_gb_s": 25.0, "cpu_adam_gparams_s": 1.0, "disk_read_gb_s": 1.3,
           "disk_write_gb_s": 2.0, "disk_gb_s": 1.58}


def _run(tmp_path, script, *args):
    env = dict(os.environ, OFFLOAD_BENCH_RESULTS=str(tmp_path), PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), *args], env=env,
                          capture_output=True, text=True, timeout=120)
    rows = [json.loads(l) for l in (tmp_path / "results.jsonl").read_text().splitlines()] \
        if (tmp_path / "results.jsonl").exists() else []
    return proc, rows


def _machine(tmp_path):
    path = tmp_path / "machine.json"
    path.write_text(json.dumps(PROFILE))
    return str(path)


def test_scale_picks_the_largest_tiny_size_and_trains_it(tmp_path):
    proc, rows = _run(tmp_path, "scale.py", "--preset", "tiny", "--device", "cpu", "--nvme", str(tmp_path / "nvme"),
                      "--machine", _machine(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "tiny-c" in proc.stdout and "does not fit" in proc.stdout
    (row,) = rows
    assert row["bench"] == "scale" and row["size"] == "tiny-b"
    assert row["loss_falling"] and len(row["losses"]) == 3 and row["rss_within_budget"]
    assert row["plan_bytes"] == row["plan_bytes_predicted"] and row["plan_bytes"]["nvme"] > 0
    assert row["moved_steps"]["disk_read"] > 0 and row["setup_s"] is not None and row["predicted_step_s"] is not None
    # Note [step timing] in bench/reference.py: steps end at the loss read; the drained window's mean beside them
    assert row["timing"] == "loss" and 0 < row["window_step_s"] < 10 * max(row["step_times"])
    assert not os.listdir(tmp_path / "nvme")       # swap files removed


def test_nvme_regime_records_the_disk_floor(tmp_path):
    proc, rows = _run(tmp_path, "nvme_regime.py", "--preset", "tiny", "--device", "cpu", "--mbs", "2",
                      "--nvme", str(tmp_path / "nvme"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = rows
    assert row["bench"] == "nvme-regime-tiny-mb2" and row["plan_bytes"]["nvme"] > 0
    moved = row["moved_steps"]
    assert row["rates"]["disk_mixed_gb_s"] > 0
    per_step = disk_seconds(moved["disk_read"], moved["disk_write"], row["rates"]) / 3     # 1 warm-up + 2 steps
    # the row rounds rates (2 decimals) and floors (4 decimals): a tiny run's floor is a few 1e-4 s
    assert row["floors"]["disk_s"] == pytest.approx(per_step, rel=0.02, abs=6e-5)
    # the CPU AdamW's floor is the elements it updated, and host memory carries those and every DMA byte
    r, f = row["rates"], row["floors"]
    assert row["adam_host_elems"] > 0
    assert f["cpu_adam_s"] == pytest.approx(row["adam_host_elems"] / (r["cpu_adam_gparams_s"] * 1e9), rel=0.02, abs=6e-5)
    dma = (moved["h2d"] + moved["d2h"]) / 3
    host_bw = max(r["mem_bw_gb_s"], r["cpu_adam_gparams_s"] * 28)   # the larger of a copy's and AdamW's
    assert f["host_mem_s"] == pytest.approx((row["adam_host_elems"] * 28 + dma) / (host_bw * 1e9),
                                            rel=0.02, abs=6e-5)


def test_nvme_regime_records_a_row_for_a_run_that_times_out(tmp_path):
    proc, rows = _run(tmp_path, "nvme_regime.py", "--preset", "tiny", "--device", "cpu", "--mbs", "2",
                      "--nvme", str(tmp_path / "nvme"), "--timeout", "1")
    (row,) = rows
    assert row["status"] == "timeout" and row["timeout_s"] == 1 and row["step_times"] == []


def test_plan_check_records_prediction_beside_measurement(tmp_path):
    proc, rows = _run(tmp_path, "plan_check.py", "--preset", "tiny", "--device", "cpu", "--configs", "tiny-nvme",
                      "--nvme", str(tmp_path / "nvme"), "--machine", _machine(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = rows
    assert row["bench"] == "plan-check" and row["placement_matches"]
    assert row["error_pct"] == pytest.approx(100 * (row["predicted_step_s"] - row["step_s"]) / row["step_s"], abs=0.2)


def test_trace_overhead_draws_the_traced_run_and_records_both(tmp_path):
    """bench/trace_overhead.py with one round: the traced worker runs first and its picture is drawn as soon
    as it ends (a cut-off untraced half keeps it); the row has both medians."""
    png, kept = tmp_path / "t.png", tmp_path / "t.trace.json"
    proc, rows = _run(tmp_path, "trace_overhead.py", "--rounds", "1", "--png", str(png), "--keep-trace", str(kept),
                      "--device", "cpu", "--hidden", "32", "--inter", "64", "--layers", "2", "--heads", "2",
                      "--vocab", "128", "--seq", "16", "--mb", "2", "--steps", "2", "--warmup", "1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = rows
    assert len(row["step_times_on"]) == len(row["step_times_off"]) == 2
    runs = [line for line in proc.stdout.splitlines() if line.startswith("== ")]
    assert ["--trace" in line for line in runs] == [True, False], runs
    assert png.stat().st_size > 1000 and json.loads(kept.read_text())


def test_dist_reference_runs_one_and_two_ranks_and_records_the_scaling(tmp_path):
    """bench/dist_reference.py on two gloo ranks (tiny shapes): a row per (system, ranks) and the summary."""
    env = dict(os.environ, OFFLOAD_BENCH_RESULTS=str(tmp_path), PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "dist_reference.py"), "--ranks", "2",
                           "--device", "cpu", "--steps", "2", "--warmup", "1"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(l) for l in (tmp_path / "results.jsonl").read_text().splitlines()]
    one, two, summary = rows
    assert "ranks" not in one and two["ranks"] == 2 and one["run"] == two["run"] == summary["run"]
    assert two["tokens_per_s"] == pytest.approx(2 * two["tokens_per_s_per_gpu"], rel=1e-3)
    assert two["floors"] == {} and two["floor_s"] is None          # a shared host: no per-rank floors
    assert len(two["losses"]) == 3 and all(x == x for x in two["losses"])
    assert summary["scaling_efficiency"] == pytest.approx(
        two["tokens_per_s"] / (2 * one["tokens_per_s"]), abs=2e-3)


def test_the_kernel_floor_prices_each_layer_its_recompute_and_the_head():
    """bench/reference.py's GPU floor from the model's own kernels: every layer's forward and backward, the
    recomputed layers' forward again (as the run's activation plan counts them), and the head; the kernels
    are timed on a tiny LLaMA layer here (on the CPU; the GPU run times them on the device)."""
    import argparse
    import reference
    a = argparse.Namespace(hidden=32, inter=64, layers=3, heads=4, vocab=50, seq=16, mb=2, activations="auto",
                           grad_accum=2)
    t = reference.kernel_times(a, "cpu")
    assert all(t[k] > 0 for k in ("block_fwd_s", "block_bwd_s", "head_s")), t
    plan = {"act_plan": ["activations auto (after step 1): keep 1, recompute+offload 1, recompute 1, swap 4; "
                         "measured per block 1 MiB"]}
    assert reference.recomputed_blocks(a, plan, "offload") == 2
    assert reference.recomputed_blocks(a, {}, "offload") == 0       # nothing said: no recompute priced
    assert reference.recomputed_blocks(a, {}, "deepspeed") == 3     # gradient checkpointing on every layer
    # the batch plan's policy where it overrode --activations
    assert reference.recomputed_blocks(a, {"batch_overrides": {"activations": "recompute"}}, "offload") == 3
    rates = {**t, "gemm_tflops": 1.0}
    got = reference.floors(a, rates, system="pytorch", recomputed=2)["gpu_kernels_s"]
    want = 2 * (3 * (t["block_fwd_s"] + t["block_bwd_s"]) + 2 * t["block_fwd_s"] + t["head_s"])
    assert got == pytest.approx(want)
    assert "gpu_kernels_s" not in reference.floors(a, {"gemm_tflops": 1.0}, system="pytorch", recomputed=2)
