"""The reference workload in the NVMe regime, side by side: offload with cpu_memory=16GiB and the rest of its
state on the local disk, and DeepSpeed ZeRO-3 with params on the CPU and optimizer states on NVMe (issue
[perf] item 2). Micro-batch 4 (the reference) and 16.

Each (system, micro-batch) runs as one bench/reference.py worker process under its own timeout, so a run
that hangs or is slow cannot take the others with it; every run leaves a row in bench/results.jsonl as soon
as it ends (a killed one a "timeout" row with the steps it finished, one the time budget leaves no room for
a "skipped" row). Rates are measured once, in this run: PCIe, GEMM and CPU AdamW as reference.py does, and
the disk on the --nvme path through offload's own store (offload.probe.disk_profile). Offload rows carry
moved_steps (bytes each tier moved over the warm-up and timed steps, setup excluded) and floors.disk_s =
those disk bytes per step at the measured rates (offload.plan.disk_seconds, as the planner prices them).

Expect the offload step to be disk-bound: with 16 GiB of CPU memory most of the 40 GB of fp32 master and
moments live on the disk and are read and written back every step (tens of seconds at ~1.3 GB/s read and ~2
GB/s write); DeepSpeed measured 47.69 s/step here. Setup writes the initial states to the disk first. Hence
--steps 2 --warmup 1 by default, and a time budget (default 540 s, under one 10-minute device call). So few
steps are timed with --timing device (every step synchronised; Note [step timing] in reference.py): timed
from loss read to loss read, the first timed step started with no backlog (the warm-up's promotion of states
waits for its updates) and ended with its whole disk update still queued, and the median of two such
intervals is no step time (run 05997af4364d: 1.76 and 26.1 s, median 13.9 s, window 27.6 s a step):

  python bench/nvme_regime.py --systems offload --mbs 4,16                 # ~6 min
  python bench/nvme_regime.py --systems deepspeed --mbs 4 --timeout 500    # ~5-8 min (its setup is slow)
  python bench/nvme_regime.py --systems offload --mbs 4 --grad-accum 4 --cpu-memory 20GiB
                                       # 16 sequences a step, 4 at a time (the fp32 accumulators need 20 GiB)
  python bench/nvme_regime.py --preset tiny --device cpu                   # small mode (CI), seconds

Micro-batch 16 itself does not fit a 24 GiB cap: its fp32 logits (16 x 2048 x 32000) are 3.9 GiB, and the
loss's backward holds three or four such tensors at once beside the recompute's block inputs, so the plan
for that batch (`offload plan --batch 16`) runs out of device memory in the loss's backward; --grad-accum 4
trains the same 16 sequences per optimizer step as four micro-batches of 4.
"""
import argparse
import json
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

# hidden, intermediate, layers, heads, vocab, seq, GPU cap (GiB), cpu_memory
SHAPES = {"reference": (3072, 8192, 28, 24, 32000, 2048, 24, "16GiB"),
          "tiny": (64, 176, 2, 4, 256, 32, 0.0008, "1800KiB")}   # tiny: states off the device, some on the disk


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="reference", choices=tuple(SHAPES))
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--systems", default="offload,deepspeed")
    p.add_argument("--mbs", default="4,16", help="micro-batch sizes, comma separated")
    p.add_argument("--nvme", default="/tmp/offload-nvme", help="a directory on the local disk")
    p.add_argument("--cpu-memory", default=None, help="offload's CPU budget (default 16GiB; tiny: 1800KiB)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (offload only)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--timeout", type=int, default=400, help="seconds per (system, micro-batch) run at most")
    p.add_argument("--time-budget", type=float, default=540, help="seconds for the whole script")
    p.add_argument("--bench", default=None)
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    import reference
    from record import record
    hidden, inter, layers, heads, vocab, seq, cap, cpu_mem = SHAPES[a.preset]
    cpu_mem = a.cpu_memory or cpu_mem
    if a.device == "cpu":
        a.systems = ",".join(s for s in a.systems.split(",") if s == "offload")   # the others need a GPU
    os.makedirs(a.nvme, exist_ok=True)
    rates = reference.measure_rates(a.device, [a.nvme])
    print("rates:", json.dumps({k: round(v, 3) for k, v in rates.items()}), flush=True)
    shape = ["--hidden", str(hidden), "--inter", str(inter), "--layers", str(layers), "--heads", str(heads),
             "--vocab", str(vocab), "--seq", str(seq), "--gpu-cap", str(cap), "--device", a.device]
    rows = []
    for mb in (int(x) for x in a.mbs.split(",")):
        for system in a.systems.split(","):
            accum = a.grad_accum if system == "offload" else 1      # DeepSpeed runs one micro-batch a step
            bench = a.bench or f"nvme-regime-{'3.37b' if a.preset == 'reference' else a.preset}-mb{mb}" + (
                f"x{accum}" if accum > 1 else "")
            left = a.time_budget - (time.perf_counter() - t0) - 10
            if left < 30:
                print(f"== {system} mb {mb}: skipped, {left:.0f} s of the time budget left", flush=True)
                record({"bench": bench, "system": system, "status": "skipped",
                        "error": f"time budget {a.time_budget:.0f} s spent", "mb": mb, "seq": seq})
                continue
            path = os.path.join(a.nvme, f"{system}-mb{mb}")   # a fresh directory: a killed run's files go with it
            shutil.rmtree(path, ignore_errors=True)
            os.makedirs(path)
            argv = shape + ["--systems", system, "--bench", bench, "--mb", str(mb), "--steps", str(a.steps),
                            "--warmup", str(a.warmup), "--nvme", path, "--timeout", str(int(min(a.timeout, left))),
                            "--rates", json.dumps(rates), "--timing", "device"]
            if system == "offload":
                argv += ["--cpu-memory", cpu_mem, "--weights", "random", "--grad-accum", str(a.grad_accum)]
            print(f"== {system} mb {mb}: timeout {min(a.timeout, left):.0f} s", flush=True)
            try:
                rows += [r for r in reference.main(argv) if "status" not in r]
            finally:
                shutil.rmtree(path, ignore_errors=True)
    for r in rows:
        disk = r.get("moved_steps") or {}
        per = (disk.get("disk_read", 0) + disk.get("disk_write", 0)) / (a.steps + a.warmup) / 1e9
        print(f"{r['bench']} {r['system']}: {r['step_s']:.3f} s/step, disk {per:.2f} GB/step, floors "
              + ", ".join(f"{k} {v:.3f}" for k, v in r["floors"].items()), flush=True)
    print(f"done in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
