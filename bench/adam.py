"""CPU AdamW step: offload's native kernel against torch's fused and foreach AdamW doing the same job.

The job is the engine's: bf16 grads in, fp32 master / exp_avg / exp_avg_sq updated, bf16 params out. Ours does it
in one pass. torch needs its casts, all timed: grad.float() into a preallocated fp32 grad, the optimizer step,
then a bf16 copy of the master. Effective GB/s counts the bytes the job must move, 28 B/param (master, m, v read
and written: 24; grad read 2; out written 2), for every system alike; beside it, copy bandwidth measured in the
same run (torch copy_ of a large fp32 buffer, read + write bytes).

    python bench/adam.py [--params 1e9] [--threads N] [--steps 5]
"""
import argparse
import gc
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from record import record  # noqa: E402

from offload import _native  # noqa: E402

BYTES_PER_PARAM = 28
HYPER = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def timed(fn, steps, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(n):
    src, dst = torch.ones(n), torch.empty(n)
    s = timed(lambda: dst.copy_(src), 5)
    return 2 * src.nbytes / s / 1e9


def inputs(n):
    # Filled, not zero, so that no lane hits a special case; every page is touched before timing.
    grad = torch.full((n,), 1e-3, dtype=torch.bfloat16)
    return grad, torch.full((n,), 0.5), torch.full((n,), 1e-4), torch.full((n,), 1e-6)


def bench_ours(n, threads, steps):
    grad, master, m, v = inputs(n)
    out = torch.empty(n, dtype=torch.bfloat16)
    views = [t.view(torch.uint8).numpy() for t in (master, grad, m, v, out)]
    state = {"step": 0}

    def step():
        state["step"] += 1
        _native.adamw_step(views[0], views[1], views[2], views[3], lr=HYPER["lr"], beta1=HYPER["betas"][0],
                           beta2=HYPER["betas"][1], eps=HYPER["eps"], weight_decay=HYPER["weight_decay"],
                           step=state["step"], grad_dtype="bfloat16", out=views[4], out_dtype="bfloat16",
                           threads=threads)
    return timed(step, steps)


def bench_torch(n, steps, **impl):
    grad, master, m, v = inputs(n)
    p = torch.nn.Parameter(master)
    p.grad = torch.empty(n)
    out = torch.empty(n, dtype=torch.bfloat16)
    opt = torch.optim.AdamW([p], **HYPER, **impl)

    def step():
        p.grad.copy_(grad)  # grad.float() into the preallocated fp32 grad
        opt.step()
        with torch.no_grad():
            out.copy_(p)
    return timed(step, steps)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=1e9, help="parameters per step (default 1e9)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for ours and torch")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per system (median reported)")
    args = ap.parse_args()
    n, threads = int(args.params), args.threads
    torch.set_num_threads(threads)
    bw = copy_bandwidth(min(n, 1 << 28))
    simd = _native.simd_level()
    rows = []
    for system, fn in ((f"offload-native-{simd}", lambda: bench_ours(n, threads, args.steps)),
                       ("torch-fused", lambda: bench_torch(n, args.steps, fused=True)),
                       ("torch-foreach", lambda: bench_torch(n, args.steps, foreach=True))):
        s = fn()
        gc.collect()
        rows.append(dict(bench="adam", system=system, params_B=n / 1e9, step_s=s, gparams_per_s=n / s / 1e9,
                         gb_per_s=BYTES_PER_PARAM * n / s / 1e9, mem_bw_gb_s=bw, threads=threads))
    fused = next(r for r in rows if r["system"] == "torch-fused")
    print(f"copy bandwidth {bw:.1f} GB/s, {threads} threads, {n / 1e9:g} B params")
    print(f"{'system':24} {'step_s':>9} {'Gparam/s':>9} {'GB/s':>7} {'vs fused':>9}")
    for r in rows:
        r["ratio_vs_torch_fused"] = fused["step_s"] / r["step_s"]
        print(f"{r['system']:24} {r['step_s']:9.4f} {r['gparams_per_s']:9.3f} {r['gb_per_s']:7.1f} "
              f"{r['ratio_vs_torch_fused']:8.2f}x")
        record(r)


if __name__ == "__main__":
    main()
