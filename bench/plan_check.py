"""The planner's predicted step time beside the measured one (issue [planner]; target: within 15%).

For each configuration: the prediction `offload plan` makes (plan.plan_for_batch, which places exactly as
offload.engine() does, then Plan.predict; Note [step-time model] in offload/plan.py), with a machine
profile measured in this run (offload.probe.probe(quick=True) on the --nvme path, and the GPU and AdamW
rates the engine itself measures, offload.machine.machine_rates: its 8192^3 matmul is the rate
COMPUTE_EFFICIENCY was derived against) or given with --machine; and the step time measured by
bench/reference.py's worker on the same configuration, in its own process, with OFFLOAD_MACHINE pointing at
the same profile so that the engine places with the rates the prediction used. Each row (bench/record.py,
bench "plan-check") has predicted_step_s, step_s, error_pct = 100 (predicted - measured) / measured, the
predicted resource times and whether the engine's placement equals the predicted one. A run that fails or
times out still leaves a row.

  python bench/plan_check.py                                   # the three configurations, ~5 min
  python bench/plan_check.py --configs reference-cpu,llama-1.3b
  python bench/plan_check.py --preset tiny --device cpu        # small mode (CI), seconds
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

# name: (hidden, intermediate, layers, heads, vocab, seq, micro-batch, cpu_memory, on the disk, steps, warm-up,
#        seconds at most)
CONFIGS = {
    "reference-cpu": (3072, 8192, 28, 24, 32000, 2048, 4, "100GiB", False, 4, 2, 150),
    "reference-nvme": (3072, 8192, 28, 24, 32000, 2048, 4, "16GiB", True, 1, 1, 240),
    "llama-1.3b": (2048, 5504, 24, 16, 32000, 2048, 8, "100GiB", False, 4, 2, 150),
}
TINY = {
    "tiny-cpu": (64, 176, 2, 4, 256, 32, 2, "64MiB", False, 2, 1, 60),
    "tiny-nvme": (64, 176, 2, 4, 256, 32, 2, "1800KiB", True, 2, 1, 60),
}


def profile(a):
    """The machine profile predictions and the engine both use."""
    from offload.probe import load_profile, probe
    if a.machine:
        return load_profile(a.machine)
    prof, _ = probe([a.nvme], quick=a.device != "cuda")   # the full disk measurement: 1 GiB a request
    if a.device == "cuda":
        import torch
        from offload.machine import machine_rates
        prof.update(machine_rates(torch.device("cuda")))
    else:
        prof["gpu_tflops"] = 0.1     # nominal: the CPU computes (the small mode checks the pipeline, not the rate)
    return prof


def predict(a, cfg, prof, nvme):
    """(StepPrediction, Plan) for one configuration, as `offload plan` makes them."""
    import torch
    from transformers import LlamaForCausalLM
    import reference
    from offload import plan as planmod
    from offload.groups import split_units
    from offload.model_config import model_shape
    from offload.sizes import parse_size
    hidden, inter, layers, heads, vocab, seq, mb, cpu_mem = cfg[:8]
    m = argparse.Namespace(hidden=hidden, inter=inter, layers=layers, heads=heads, vocab=vocab, seq=seq, mb=mb)
    with torch.device("meta"):
        model = LlamaForCausalLM(reference.model_config(m))
    units = split_units(model)
    shape = model_shape(model, units, seq)
    plan, act = planmod.plan_for_batch(units, shape, mb, rates=prof, itemsize=2 if a.device == "cuda" else 4,
                                       device=a.device, gpu_budget=int(a.gpu_cap * 2**30),
                                       cpu_budget=parse_size(cpu_mem, "cpu_memory"), nvme=[nvme] if nvme else None,
                                       grad_accum=1, activations="auto")
    return plan.predict(mb * seq, prof, shape, act), plan, act


def measure(a, name, cfg, nvme, timeout, env):
    """The worker's RESULT dict, or a dict with "status" when it failed or timed out."""
    import reference
    hidden, inter, layers, heads, vocab, seq, mb, cpu_mem, _, steps, warmup, _ = cfg
    cmd = [sys.executable, os.path.join(HERE, "reference.py"), "--worker", "offload", "--device", a.device,
           "--weights", "random", "--hidden", str(hidden), "--inter", str(inter), "--layers", str(layers),
           "--heads", str(heads), "--vocab", str(vocab), "--seq", str(seq), "--mb", str(mb),
           "--gpu-cap", str(a.gpu_cap), "--cpu-memory", cpu_mem, "--steps", str(steps), "--warmup", str(warmup)]
    if nvme:
        cmd += ["--nvme", nvme]
    print(f"== {name}: measuring (timeout {timeout:.0f} s)", flush=True)
    out, timed_out = reference.run_worker(cmd, env, timeout, stream=a.verbose)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], f"plan-check-{name}.log"), "w") as f:
            f.write(out)
    res = next((json.loads(l[7:]) for l in out.splitlines() if l.startswith("RESULT ")), None)
    if res is None:
        tail = out.strip().splitlines()[-1][:300] if out.strip() else "no output"
        return {"status": "timeout" if timed_out else "failed", "error": tail}
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="reference", choices=("reference", "tiny"))
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--configs", default=None, help="comma-separated names (default: all of the preset)")
    p.add_argument("--machine", default=None, help="a profile from `offload probe` instead of measuring")
    p.add_argument("--gpu-cap", type=float, default=None, help="GiB (default 24; tiny 0.0008)")
    p.add_argument("--nvme", default="/tmp/offload-nvme", help="a directory on the local disk")
    p.add_argument("--time-budget", type=float, default=540, help="seconds for the whole script")
    p.add_argument("--verbose", action="store_true", help="echo the workers' output")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    from record import record
    table = TINY if a.preset == "tiny" else CONFIGS
    a.gpu_cap = a.gpu_cap if a.gpu_cap is not None else (0.0008 if a.preset == "tiny" else 24.0)
    os.makedirs(a.nvme, exist_ok=True)
    prof = profile(a)
    print("profile: " + json.dumps({k: round(v, 2) for k, v in prof.items() if isinstance(v, (int, float))}), flush=True)
    tmp = tempfile.mkdtemp(prefix="plan-check-")
    prof_path = os.path.join(tmp, "machine.json")
    with open(prof_path, "w") as f:
        json.dump(prof, f)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OFFLOAD_MACHINE=prof_path,
               OFFLOAD_BENCH_RUN=os.environ.get("OFFLOAD_BENCH_RUN") or uuid.uuid4().hex[:12])
    errors = []
    try:
        for name in (a.configs.split(",") if a.configs else list(table)):
            cfg = table[name]
            nvme = os.path.join(a.nvme, f"plan-check-{name}") if cfg[8] else None
            base = {"bench": "plan-check", "system": "offload", "config": name, "mb": cfg[6], "seq": cfg[5],
                    "cpu_memory": cfg[7], "nvme": bool(nvme), "gpu_cap_gib": a.gpu_cap}
            try:
                pred, plan, act = predict(a, cfg, prof, nvme)
            except Exception as e:     # a BudgetError is a result too: the planner refuses what the run may not
                record(dict(base, status="failed", error=f"prediction: {type(e).__name__}: {e}"[:300]))
                continue
            print(f"== {name}: predicted {pred.step_s:.3f} s ({pred.bottleneck}; "
                  + ", ".join(f"{k} {v:.3f}" for k, v in pred.resource_s.items())
                  + f", CPU AdamW starts at {pred.cpu_start_s:.3f}), activations {act.policy}", flush=True)
            base.update(predicted_step_s=round(pred.step_s, 6), bottleneck_predicted=pred.bottleneck,
                        resource_s={k: round(v, 4) for k, v in pred.resource_s.items()},
                        cpu_start_s=round(pred.cpu_start_s, 4), activations_predicted=act.policy,
                        plan_bytes_predicted=dict(plan.bytes))
            left = a.time_budget - (time.perf_counter() - t0) - 10
            if left < 30:
                record(dict(base, status="skipped", error=f"time budget {a.time_budget:.0f} s spent"))
                continue
            if nvme:
                shutil.rmtree(nvme, ignore_errors=True)
                os.makedirs(nvme)
            try:
                res = measure(a, name, cfg, nvme, min(cfg[11], left), env)
            finally:
                if nvme:
                    shutil.rmtree(nvme, ignore_errors=True)
            if "status" in res:
                print(f"   {res['status']}: {res['error']}", flush=True)
                record(dict(base, **res))
                continue
            step = statistics.median(res["times"])
            err = 100 * (pred.step_s - step) / step
            errors.append(abs(err))
            row = dict(base, step_s=round(step, 6), error_pct=round(err, 1), within_15pct=abs(err) <= 15,
                       step_times=[round(t, 3) for t in res["times"]], losses=[round(x, 4) for x in res["losses"]],
                       plan_bytes=res.get("plan_bytes"), placement_matches=res.get("plan_bytes") == dict(plan.bytes),
                       moved_steps=res.get("moved_steps"), setup_s=res.get("setup_s"),
                       peak_gpu_gib=round(res["peak_gpu_gib"], 2), host_rss_gib=round(res["host_rss_gib"], 2),
                       params_B=round(sum(plan.bytes.values()) and sum(u.numel for u in plan.units) / 1e9, 3))
            record(row)
            print(f"   measured {step:.3f} s: predicted/measured {pred.step_s / step:.3f} ({err:+.1f}%), "
                  f"placement {'matches' if row['placement_matches'] else 'DIFFERS'}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"done in {time.perf_counter() - t0:.0f} s; |error| " +
          (f"max {max(errors):.1f}%, {sum(e <= 15 for e in errors)}/{len(errors)} within 15%" if errors else "none measured"),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
