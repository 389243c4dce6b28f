"""Host overhead of the engine's step, on a model whose compute is negligible: many small units, so the
step time is the engine's own Python and bookkeeping. Reports host seconds per step per unit, and per step
in the steady state (after warm-up): tensor allocations and bytes requested from torch's allocator (from
torch.profiler's memory events), net growth of live Python blocks and of live tensors (leaks). Recorded
with bench/record.py.

  python bench/host_overhead.py [--units 64] [--width 64] [--steps 20] [--warmup 5] [--device cpu|cuda]
"""
import argparse
import gc
import statistics
import sys
import time
import os

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))


def build(units, width):
    import torch
    torch.manual_seed(0)
    blocks = [torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU()) for _ in range(units)]
    return torch.nn.Sequential(*blocks)


def live_tensors():
    import torch
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--units", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tier", default="cpu", choices=("device", "cpu"), help="where optimizer states live")
    a = p.parse_args()
    import torch
    import offload
    from record import record
    model = build(a.units, a.width)
    n = sum(q.numel() for q in model.parameters())
    budgets = dict(gpu_memory=64 * n, cpu_memory=None) if a.tier == "device" else \
        dict(gpu_memory=4 * n + (1 << 20), cpu_memory=None)
    dev = torch.device(a.device)
    eng = offload.engine(model, optimizer=offload.AdamW(lr=1e-3), device=a.device, dtype=torch.float32, **budgets)
    x = torch.randn(8, a.width, device=dev)

    def step():
        loss = eng(x).pow(2).mean()
        eng.backward(loss)
        eng.step()
        eng.sync()

    for _ in range(a.warmup):
        step()
    times = []
    blocks0, tensors0 = sys.getallocatedblocks(), live_tensors()
    for _ in range(a.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    gc.collect()
    blocks1, tensors1 = sys.getallocatedblocks(), live_tensors()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(a.steps):
            step()
    mem = [e for e in prof.events() if e.name == "[memory]"]
    allocs = [e for e in mem if e.cpu_memory_usage > 0]
    # On CUDA the model's own ops (activations, their gradients) take blocks from the caching allocator
    # every step whatever trains it; counted apart, they are not host overhead.
    dev_allocs = [e for e in mem if getattr(e, "device_memory_usage", 0) > 0]
    eng.close()
    step_s = statistics.median(times)
    row = {"bench": "host-overhead", "system": "offload", "step_s": round(step_s, 6), "units": a.units,
           "tier": a.tier, "host_us_per_unit_step": round(step_s / a.units * 1e6, 1),
           "tensor_allocs_per_step": round(len(allocs) / a.steps, 1),
           "alloc_bytes_per_step": int(sum(e.cpu_memory_usage for e in allocs) / a.steps),
           "compute": a.device, "device_allocs_per_step": round(len(dev_allocs) / a.steps, 1),
           "python_blocks_growth_per_step": round((blocks1 - blocks0) / a.steps, 1),
           "live_tensor_growth_per_step": round((tensors1 - tensors0) / a.steps, 2)}
    print(row)
    record(row)


if __name__ == "__main__":
    main()
