"""The largest LLaMA-shaped model that trains on one GPU capped at --gpu-cap GiB, CPU memory filled first
and the rest of the model state on the disk (issue [perf] item 3). DeepSpeed's ZeRO-3 CPU offload was
OOM-killed at 6.74B on the H200 machine (24 GiB cap, 128 GiB RAM); the target here is >= 10B.

1. Budgets: --cpu-memory (default 0.8 x MemAvailable, as the engine's own default), --nvme directories and
   their free space, --gpu-cap.
2. Rates: measured now (the engine's quick GPU and AdamW rates, the disk through offload's store on the
   first --nvme path), or --machine PROFILE.json.
3. For each shape of SIZES, the engine's placement (plan.plan_for_batch, i.e. plan.engine_placement: what
   offload.engine() will build) on the meta device: a BudgetError, or disk state beyond the free space,
   rules a size out. For the rest: predicted step time (Plan.predict) and setup time (initialising writes
   the disk's share of params and fp32 master/m/v, ~12 B per parameter of states, at the disk's write rate,
   and every parameter is generated and written to its tier at about INIT_GB_S). The default pick is the
   largest size whose estimated start + setup + --steps steps fits --time-budget (default 540 s, under one
   10-minute device call); --size forces one.
4. Training: bench/reference.py's worker in its own process (timeout: what is left of the budget), the model
   built on the meta device and initialised by the engine (weights=RandomInit()): no whole-model copy ever
   exists in host memory. One batch every step, so the loss must fall. Its row (bench/record.py) has step
   times, losses, loss_falling, peak_gpu_gib, host_rss_gib (peak VmHWM of the worker) against cpu_memory_gib
   and RSS_OVERHEAD_GIB, plan bytes per tier, moved bytes, setup_s, predicted_step_s (the planner's, compute
   included) and the estimates. A worker that times out or fails still leaves a row.

  python bench/scale.py                               # pick the largest that fits 540 s, train 3 steps
  python bench/scale.py --size 10b --time-budget 560  # that size whatever the estimate says
  python bench/scale.py --dry-run                     # the table of sizes and estimates only
  python bench/scale.py --preset tiny --device cpu    # small mode (CI): tiny shapes on the CPU, seconds
"""
import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

# name: hidden, intermediate, layers, heads (vocab 32000, untied head, LLaMA-1/2 shapes where they exist)
SIZES = {"6.7b": (4096, 11008, 32, 32), "8b": (4096, 14336, 32, 32), "10b": (5120, 13824, 32, 40),
         "13b": (5120, 13824, 40, 40), "20b": (6144, 16384, 44, 48), "33b": (6656, 17920, 60, 52)}
TINY = {"tiny-a": (64, 176, 2, 4), "tiny-b": (128, 352, 4, 4), "tiny-c": (512, 1408, 8, 8)}
VOCAB = {"reference": 32000, "tiny": 256}
RSS_OVERHEAD_GIB = 8.0   # host memory beside cpu_memory: CUDA context and libraries (~3-5 GiB), the engine's
                         # weight-assembly buffers (two units in fp32), Python and torch
INIT_GB_S = 4.0          # parameters generated and written to their tier at setup, fp32 bytes per second
START_S = 30.0           # worker start: imports, CUDA context, the engine's own rate measurement


def budgets(a):
    import psutil
    from offload.sizes import parse_size
    cpu = parse_size(a.cpu_memory, "--cpu-memory") if a.cpu_memory else int(psutil.virtual_memory().available * 0.8)
    free = min(os.statvfs(p).f_bavail * os.statvfs(p).f_frsize for p in a.nvme) * len(a.nvme)
    return int(a.gpu_cap * 2**30), cpu, free


def rates(a):
    """A machine profile: --machine, or measured now (on the CPU: nominal rates, the disk measured)."""
    from offload.plan import DEFAULT_RATES
    from offload.probe import disk_profile, load_profile
    if a.machine:
        return load_profile(a.machine)
    r = dict(DEFAULT_RATES)
    if a.device == "cuda":
        # In a process of its own: this one must not hold a CUDA context and its host memory (a few GiB) beside
        # the worker, whose host memory is the point of the benchmark.
        import subprocess
        code = ("import json, torch; from offload.machine import machine_rates; "
                "print('RATES ' + json.dumps(machine_rates(torch.device('cuda'))))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
        r.update(json.loads(next(l[6:] for l in out.splitlines() if l.startswith("RATES "))))
    else:
        r["gpu_tflops"] = 0.1   # nominal: the CPU as the compute device (predictions are not the point here)
    r.update(disk_profile(a.nvme[:1], (256 if a.device == "cuda" else 16) << 20)[0])
    return r


def model_args(a, name):
    hidden, inter, layers, heads = (TINY if a.preset == "tiny" else SIZES)[name]
    return argparse.Namespace(hidden=hidden, inter=inter, layers=layers, heads=heads, vocab=VOCAB[a.preset],
                              seq=a.seq, mb=a.mb)


def estimate(a, name, gpu_b, cpu_b, free, r):
    """{"fits", "why", plan figures, "predicted_step_s", "setup_s", "total_s"} of one size, from the
    engine's placement on the meta device."""
    import torch
    from transformers import LlamaForCausalLM
    import reference
    from offload import plan as planmod
    from offload.errors import BudgetError
    from offload.groups import split_units
    from offload.model_config import model_shape
    m = model_args(a, name)
    with torch.device("meta"):
        model = LlamaForCausalLM(reference.model_config(m))
    units = split_units(model)
    shape = model_shape(model, units, a.seq)
    out = {"size": name, "params_B": round(shape.params / 1e9, 3)}
    itemsize = 2 if a.device == "cuda" else 4
    try:
        plan, act = planmod.plan_for_batch(units, shape, a.mb, rates=r, itemsize=itemsize, device=a.device,
                                           gpu_budget=gpu_b, cpu_budget=cpu_b, nvme=a.nvme, grad_accum=1,
                                           activations="auto")
    except BudgetError as e:
        return dict(out, fits=False, why=str(e))
    pred = plan.predict(a.mb * a.seq, r, shape, act)
    nv = plan.bytes["nvme"]
    setup = nv / (r["disk_write_gb_s"] * 1e9) + shape.params * 4 / (INIT_GB_S * 1e9)
    total = START_S + setup + a.steps * pred.step_s
    out.update(plan_bytes=dict(plan.bytes), activations=act.policy, predicted_step_s=round(pred.step_s, 2),
               bottleneck=pred.bottleneck, setup_s_est=round(setup, 1), total_s_est=round(total, 1))
    if nv * 1.02 > free:
        return dict(out, fits=False, why=f"the disk has {free / 1e9:.1f} GB free, the plan puts {nv / 1e9:.1f} GB "
                                          f"there (plus 2%)")
    return dict(out, fits=True, why="")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="reference", choices=("reference", "tiny"), help="tiny: small mode shapes")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--sizes", default=None, help="comma-separated names to consider (default: all of the preset)")
    p.add_argument("--size", default=None, help="train this size, whatever the time estimate")
    p.add_argument("--gpu-cap", type=float, default=None,
                   help="GiB (set_per_process_memory_fraction on CUDA; default 24, tiny 8 MiB)")
    p.add_argument("--cpu-memory", default=None, help="CPU budget (default: 0.8 x MemAvailable; tiny 8MiB)")
    p.add_argument("--nvme", nargs="+", default=["/tmp/offload-nvme"], help="directories for the disk tier")
    p.add_argument("--machine", default=None, help="a profile from `offload probe` instead of measuring")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--mb", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="steps trained (the first is timed too, separately)")
    p.add_argument("--lr", type=float, default=None, help="default 1e-4 (tiny 1e-3)")
    p.add_argument("--time-budget", type=float, default=540, help="seconds for the whole script")
    p.add_argument("--dry-run", action="store_true", help="print the sizes and estimates, train nothing")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    tiny = a.preset == "tiny"   # budgets in which tiny-b fits with part of its states on the disk, tiny-c not at all
    a.seq = 32 if tiny and a.seq == 2048 else a.seq
    a.gpu_cap = a.gpu_cap if a.gpu_cap is not None else (8 / 1024 if tiny else 24.0)
    a.cpu_memory = a.cpu_memory or ("8MiB" if tiny else None)
    a.lr = a.lr or (1e-3 if tiny else 1e-4)
    for d in a.nvme:
        os.makedirs(d, exist_ok=True)
    gpu_b, cpu_b, free = budgets(a)
    r = rates(a)
    import psutil
    print(f"budgets: gpu {gpu_b / 2**30:.3f} GiB, cpu {cpu_b / 2**30:.3f} GiB (MemAvailable "
          f"{psutil.virtual_memory().available / 2**30:.1f} GiB), disk free {free / 2**30:.1f} GiB "
          f"on {', '.join(a.nvme)}; rates: " + json.dumps({k: round(v, 2) for k, v in r.items()
                                                             if isinstance(v, (int, float))}), flush=True)
    avail = psutil.virtual_memory().available
    if cpu_b + RSS_OVERHEAD_GIB * 2**30 > avail and not tiny:
        why = (f"--cpu-memory {cpu_b / 2**30:.1f} GiB plus {RSS_OVERHEAD_GIB} GiB of overhead is more than the "
               f"{avail / 2**30:.1f} GiB available: the run would be OOM-killed; lower --cpu-memory")
        print(why, flush=True)
        if not a.dry_run:
            from record import record
            record({"bench": "scale", "system": "offload", "status": "failed", "error": why})
            return 1
    names = a.sizes.split(",") if a.sizes else list(TINY if a.preset == "tiny" else SIZES)
    est = []
    for name in names:
        e = estimate(a, name, gpu_b, cpu_b, free, r)
        est.append(e)
        if e["fits"]:
            b = e["plan_bytes"]
            print(f"  {name:>7} {e['params_B']:7.2f} B: gpu {b['gpu'] / 2**30:6.1f} GiB, cpu {b['cpu'] / 2**30:6.1f} GiB, "
                  f"disk {b['nvme'] / 2**30:6.1f} GiB; step ~{e['predicted_step_s']:.1f} s ({e['bottleneck']}), "
                  f"setup ~{e['setup_s_est']:.0f} s (writes {b['nvme'] / 1e9:.0f} GB to the disk at "
                  f"{r['disk_write_gb_s']:.1f} GB/s), start + setup + {a.steps} steps ~{e['total_s_est']:.0f} s", flush=True)
        else:
            print(f"  {name:>7} {e['params_B']:7.2f} B: does not fit: {e['why']}", flush=True)
    left = a.time_budget - (time.perf_counter() - t0)
    if a.size:
        pick = next((e for e in est if e["size"] == a.size), None) or estimate(a, a.size, gpu_b, cpu_b, free, r)
    else:
        ok = [e for e in est if e["fits"] and e["total_s_est"] <= left]
        pick = max(ok, key=lambda e: e["params_B"]) if ok else None
    if pick is None or not pick["fits"]:
        print(f"nothing to train: {pick['why'] if pick else 'no size fits the budgets and the time left'}", flush=True)
        from record import record
        record({"bench": "scale", "system": "offload", "status": "failed",
                "error": pick["why"] if pick else f"no size fits in {left:.0f} s", "estimates": est})
        return 1
    print(f"picked {pick['size']} ({pick['params_B']} B parameters): estimated {pick['total_s_est']:.0f} s of the "
          f"{left:.0f} s left", flush=True)
    if a.dry_run:
        return 0
    import reference
    m = model_args(a, pick["size"])
    argv = ["--systems", "offload", "--bench", "scale", "--device", a.device, "--weights", "random",
            "--same-batch", "--stream", "--hidden", str(m.hidden), "--inter", str(m.inter), "--layers",
            str(m.layers), "--heads", str(m.heads), "--vocab", str(m.vocab), "--seq", str(a.seq), "--mb", str(a.mb),
            "--gpu-cap", str(a.gpu_cap), "--cpu-memory", str(cpu_b), "--nvme", *a.nvme, "--lr", str(a.lr),
            "--steps", str(a.steps - 1), "--warmup", "1",
            "--timeout", str(max(30, int(a.time_budget - (time.perf_counter() - t0) - 15))),
            "--rates", json.dumps(_reference_rates(r))]
    extra = {"size": pick["size"], "cpu_memory_gib": round(cpu_b / 2**30, 2), "rss_overhead_gib": RSS_OVERHEAD_GIB,
             "disk_free_gib": round(free / 2**30, 1), "predicted_step_s": pick["predicted_step_s"],
             "bottleneck_predicted": pick["bottleneck"], "setup_s_est": pick["setup_s_est"],
             "total_s_est": pick["total_s_est"], "disk_rates": {k: round(r[k], 2) for k in ("disk_read_gb_s", "disk_write_gb_s")},
             "plan_bytes_predicted": pick["plan_bytes"]}
    row = reference.main(argv, extra=extra, save=False)[0]
    from record import record
    if "status" in row:
        record(row)
        print(f"the run did not finish: {row['status']}, {row.get('error')}", flush=True)
        return 1
    falling = row["loss_falling"]
    row["rss_within_budget"] = within = row["host_rss_gib"] <= cpu_b / 2**30 + RSS_OVERHEAD_GIB
    record(row)
    print(f"{pick['size']}: {len(row['losses'])} steps, losses {row['losses']} "
          f"({'finite and falling' if falling else 'NOT falling'}), step {row['step_s']:.1f} s (predicted "
          f"{pick['predicted_step_s']:.1f}), setup {row.get('setup_s')} s (estimated {pick['setup_s_est']:.0f}), "
          f"peak GPU {row['peak_gpu_gib']:.1f} GiB, peak RSS {row['host_rss_gib']:.1f} GiB against cpu_memory "
          f"{cpu_b / 2**30:.1f} + {RSS_OVERHEAD_GIB} GiB ({'within' if within else 'OVER'})", flush=True)
    return 0 if falling and within else 1


def _reference_rates(r):
    """reference.py's rate names (for its floors) from a profile."""
    out = {"cpu_adam_gparams_s": r["cpu_adam_gparams_s"], "disk_read_gb_s": r["disk_read_gb_s"],
           "disk_write_gb_s": r["disk_write_gb_s"], "disk_gb_s": r["disk_gb_s"]}
    for k in ("disk_mixed_gb_s", "mem_bw_gb_s"):   # in profiles from `offload probe`; the floors use them
        if r.get(k):
            out[k] = r[k]
    if r.get("pcie_h2d_gb_s") and r.get("gpu_tflops"):
        out.update(h2d_gb_s=r["pcie_h2d_gb_s"], d2h_gb_s=r["pcie_d2h_gb_s"], gemm_tflops=r["gpu_tflops"])
    return out


if __name__ == "__main__":
    sys.exit(main())
