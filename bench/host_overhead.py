"""Host overhead of the engine's step, on a model whose compute is negligible: many small units, so the
step time is the engine's own Python and bookkeeping. Reports host seconds per step per unit, and per step
in the steady state (after warm-up): the allocations the engine's step asks of torch beyond what the same
model's own ops ask for under plain PyTorch (every allocation event torch.profiler records, matched op by
op; the optimizer's closures run on the profiled thread while counting), and net growth of live Python
blocks and of live tensors (leaks). Recorded with bench/record.py.

  python bench/host_overhead.py [--units 64] [--width 64] [--steps 20] [--warmup 5] [--device cpu|cuda]
"""
import argparse
import contextlib
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


def memory_events(prof):
    """Every allocation the profiler saw, as (device type name, bytes, thread, time ns): from its raw
    events, where each allocation is one "[memory]" event (prof.events() folds those made inside an op into
    the op's net usage, and keeps apart only the ones made outside any op)."""
    out = []
    for e in prof.profiler.kineto_results.events():
        if e.name() == "[memory]" and e.nbytes() > 0:
            out.append((str(e.device_type()).split(".")[-1], e.nbytes(), e.start_thread_id(), e.start_ns()))
    return out


def allocation_sites(prof, allocs):
    """Counter of (device kind, 'outer > ... > innermost' op names) enclosing each allocation (same thread):
    one sweep over ops and allocations in time order per thread, the open ops on a stack."""
    import collections
    by_thread = collections.defaultdict(list)   # thread -> [(time, 0 = op start / 1 = allocation, ...)]
    for e in prof.profiler.kineto_results.events():
        if e.name() != "[memory]" and str(e.device_type()).endswith("CPU"):
            by_thread[e.start_thread_id()].append((e.start_ns(), 0, e.end_ns(), e.name()))
    for kind, _, thread, t in allocs:
        by_thread[thread].append((t, 1, kind, None))
    sites = collections.Counter()
    for items in by_thread.values():
        items.sort(key=lambda x: (x[0], x[1]))
        stack = []   # (end, name) of the ops open at the current time, outermost first
        for t, what, x, name in items:
            while stack and stack[-1][0] < t:
                stack.pop()
            if what == 0:
                stack.append((x, name))
            else:
                sites[(x, " > ".join(n for _, n in stack[-3:]) or "(outside any op)")] += 1
    return sites


@contextlib.contextmanager
def inline_worker(eng):
    """The engine's optimizer closures run on the calling thread while counting: the profiler records only
    the threads it was started on (and autograd's), so the CPU AdamW's own thread would go uncounted. The
    caller warms this thread up first (its per-thread scratch and scalars are made on first use)."""
    eng.worker.sync()
    eng.worker.submit = lambda fn, priority=None, ready=None: fn()
    try:
        yield
    finally:
        del eng.worker.submit


def allocation_counts(step, steps):
    """allocation_sites of `steps` calls of step(), profiled."""
    import torch
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(steps):
            step()
    return allocation_sites(prof, memory_events(prof))


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
    with inline_worker(eng):
        step()   # this thread's first optimizer update makes its scratch
        eng_sites = allocation_counts(step, a.steps)
    eng.close()
    # The same model trained by plain PyTorch (forward, backward, gradients set to None as zero_grad does):
    # the allocations its own ops make every step whatever trains it (activations, their gradients). What
    # the engine's step makes beyond them, op by op, is the engine's.
    ref = build(a.units, a.width).to(dev)

    def plain_step():
        ref(x).pow(2).mean().backward()
        for q in ref.parameters():
            q.grad = None
    for _ in range(a.warmup):
        plain_step()
    plain_sites = allocation_counts(plain_step, a.steps)
    extra = {k: eng_sites[k] - plain_sites.get(k, 0) for k in eng_sites if eng_sites[k] > plain_sites.get(k, 0)}
    per = lambda c: round(sum(c.values()) / a.steps, 1)   # noqa: E731
    print("host allocations per step beyond plain PyTorch's, by the ops around them:" if extra else
          "no host allocation per step beyond plain PyTorch's")
    for (kind, where), k in sorted(extra.items(), key=lambda kv: -kv[1])[:8]:
        print(f"  {k / a.steps:6.1f}  {kind}  {where}")
    step_s = statistics.median(times)
    row = {"bench": "host-overhead", "system": "offload", "step_s": round(step_s, 6), "units": a.units,
           "tier": a.tier, "host_us_per_unit_step": round(step_s / a.units * 1e6, 1),
           "compute": a.device,
           "engine_host_allocs_per_step": per({k: v for k, v in extra.items() if k[0] == "CPU"}),
           "engine_device_allocs_per_step": per({k: v for k, v in extra.items() if k[0] != "CPU"}),
           "host_allocs_per_step": per({k: v for k, v in eng_sites.items() if k[0] == "CPU"}),
           "plain_host_allocs_per_step": per({k: v for k, v in plain_sites.items() if k[0] == "CPU"}),
           "python_blocks_growth_per_step": round((blocks1 - blocks0) / a.steps, 1),
           "live_tensor_growth_per_step": round((tensors1 - tensors0) / a.steps, 2)}
    print(row)
    record(row)


if __name__ == "__main__":
    main()
