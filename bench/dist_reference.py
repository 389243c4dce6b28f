"""The reference workload on several GPUs of one host (issue [dist-gpu]), side by side in one run: offload on
one GPU, offload sharded over N ranks (NCCL, one GPU each, the 24 GiB cap on every GPU), and DeepSpeed
ZeRO-3 with params and optimizer on the CPU over the same N ranks. Each system runs as bench/reference.py
workers under torchrun (reference.py --ranks), so its rows carry step time, tokens/s (all ranks, and per
GPU), the fullest rank's GPU peak and the host memory of all ranks; the micro-batch is per rank (weak
scaling: N ranks train N times the tokens of one). Then one summary row, bench "dist-reference-3.37b":

  scaling_efficiency = tokens/s on N ranks / (N x tokens/s on one)      (offload, same machine, same run)
  vs_deepspeed       = DeepSpeed's step / offload's step on N ranks      (same tokens per step)

The ranks share the host: its cores run every rank's CPU AdamW and its memory holds every rank's share of
the states, so rows of several ranks carry no floors (one rank's counters cannot price a shared host).

  python bench/dist_reference.py --ranks 2                 # on a machine with 2 GPUs, ~8 min
  python bench/dist_reference.py --ranks 2 --device cpu    # tiny shapes, gloo: how CI runs it
"""
import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

TINY = ["--hidden", "64", "--inter", "176", "--layers", "2", "--heads", "4", "--vocab", "256", "--seq", "32",
        "--gpu-cap", "0.0008", "--cpu-memory", "64MiB"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--systems", default="offload,deepspeed", help="what runs on --ranks (offload also on one)")
    p.add_argument("--cpu-memory", default="100GiB", help="offload's CPU budget per rank (as engine()'s "
                   "cpu_memory; each rank holds 1/N of the states)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--timeout", type=int, default=240, help="seconds per (system, ranks) run")
    a = p.parse_args(argv)
    if a.ranks < 2:
        p.error("--ranks: 2 or more (one rank is bench/reference.py)")
    import reference
    from record import record, run_id
    systems = a.systems.split(",")
    if a.device == "cuda":
        import torch
        if torch.cuda.device_count() < a.ranks:
            p.error(f"--ranks {a.ranks} needs {a.ranks} GPUs; this machine has {torch.cuda.device_count()}")
        shape = ["--cpu-memory", a.cpu_memory]
        bench = "dist-reference-3.37b"
    else:
        systems = [s for s in systems if s == "offload"]     # DeepSpeed needs a GPU
        shape = TINY + ["--weights", "random"]
        bench = "dist-reference-tiny"
    t0 = time.perf_counter()
    rates = reference.measure_rates(a.device)
    common = shape + ["--device", a.device, "--steps", str(a.steps), "--warmup", str(a.warmup), "--timeout",
                      str(a.timeout), "--rates", json.dumps(rates), "--bench", bench]
    rows = {}
    for system, ranks in [("offload", 1)] + [(s, a.ranks) for s in systems]:
        print(f"== {system} on {ranks} rank{'s' if ranks > 1 else ''}", flush=True)
        got = reference.main(common + ["--systems", system, "--ranks", str(ranks)])
        rows[(system, ranks)] = next((r for r in got if "status" not in r), None)
    one, many = rows.get(("offload", 1)), rows.get(("offload", a.ranks))
    ds = rows.get(("deepspeed", a.ranks))
    summary = {"bench": bench, "system": "offload", "run": run_id(), "ranks": a.ranks}
    if one and many:
        summary.update(step_s=many["step_s"], step_s_one_rank=one["step_s"],
                       tokens_per_s=many["tokens_per_s"], tokens_per_s_per_gpu=many["tokens_per_s_per_gpu"],
                       tokens_per_s_one_rank=one["tokens_per_s"],
                       scaling_efficiency=round(many["tokens_per_s"] / (a.ranks * one["tokens_per_s"]), 3))
    else:
        summary.update(status="failed", error="offload did not finish on " + (
            "one rank" if not one else f"{a.ranks} ranks") + ": see its failure row")
    if many and ds:
        summary["deepspeed_step_s"] = ds["step_s"]
        summary["vs_deepspeed"] = round(ds["step_s"] / many["step_s"], 2)
    record(summary)
    print(json.dumps(summary), flush=True)
    print(f"done in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0 if one and many else 1


if __name__ == "__main__":
    sys.exit(main())
