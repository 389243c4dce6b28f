"""Activation policies side by side: activations="auto" against full recompute and keep, on two workloads,
each run in its own process through bench/reference.py (its worker, rates, floors and record() row).

- long-context: LLaMA-shaped ~1.3B (hidden 2048, intermediate 5504, 24 layers, 16 heads, vocab 32000),
  seq 32768, micro-batch 1, 24 GiB GPU cap. Keeping every activation needs far more than 24 GiB (expected
  to fail: the row is recorded with status "failed"). Target: auto trains inside 24 GiB and is >= 15%
  faster than full recompute (DeepSpeed full recompute: 2.66 s/step on an H100).
- reference: the 3.37B reference workload (seq 2048, micro-batch 4, 24 GiB cap). Target: auto >= 10%
  faster than full recompute where compute binds.

Rows share one run id; each row has step_s (median), peak_gpu_gib, activations and the plan's choice.
Sized to finish in about 6 minutes on one H200:

  python bench/activations.py                      # both workloads, policies auto,recompute,keep
  python bench/activations.py --workloads long-context --policies auto,recompute --steps 4
"""
import argparse
import os
import subprocess
import sys
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))

WORKLOADS = {
    "long-context": ["--bench", "activations-long-1.3b-32k", "--hidden", "2048", "--inter", "5504",
                     "--layers", "24", "--heads", "16", "--vocab", "32000", "--seq", "32768", "--mb", "1"],
    "reference": ["--bench", "activations-reference-3.37b"],
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--workloads", default="long-context,reference")
    p.add_argument("--policies", default="auto,recompute,keep")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2, help="auto decides after step 1 and calibrates a split in step 2")
    p.add_argument("--gpu-cap", default="24")
    p.add_argument("--timeout", type=int, default=170, help="seconds per policy run")
    a = p.parse_args()
    env = dict(os.environ, OFFLOAD_BENCH_RUN=os.environ.get("OFFLOAD_BENCH_RUN") or uuid.uuid4().hex[:12])
    status = 0
    for w in a.workloads.split(","):
        for policy in a.policies.split(","):
            cmd = [sys.executable, os.path.join(HERE, "reference.py"), "--systems", "offload",
                   "--activations", policy, "--steps", str(a.steps), "--warmup", str(a.warmup),
                   "--gpu-cap", a.gpu_cap, "--timeout", str(a.timeout)] + WORKLOADS[w]
            print(f"== {w} activations={policy}", flush=True)
            status |= subprocess.call(cmd, env=env)
    return status


if __name__ == "__main__":
    sys.exit(main())
