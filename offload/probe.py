"""Machine profiles: what `offload probe` measures here, and what `offload plan --machine` prices a step with.

A profile is a flat JSON object; every rate is a measured (or, for a described machine, a stated) figure:
- pcie_gb_s: pinned host<->device copy rate, both directions at once (None without CUDA)
- pcie_h2d_gb_s, pcie_d2h_gb_s: each direction alone
- gpu_tflops: dense bf16 matmul rate; gpu_memory_bytes: free device memory (None without CUDA)
- disk_read_gb_s, disk_write_gb_s: best rate over queue depths, summed over nvme_paths (the store stripes);
  disk_gb_s: their harmonic mean, the rate of an equal read/write mix taken in turns;
  disk_mixed_gb_s: bytes read plus written per second with reads and writes in flight at once, as a step
  that streams optimizer states moves them (an SSD overlaps the two in part)
- cpu_adam_gparams_s: native AdamW (fp32 master/moments, bf16 grad and output), 1e9 elements per second;
  torch_adam_gparams_s: torch.optim.AdamW(fused=True), fp32 throughout, for comparison
- mem_bw_gb_s: host memory copy bandwidth (bytes read + written); cpu_memory_bytes: total host memory
- nvme_paths: the directories measured
- probe_s: seconds `offload probe` took to measure all of this
"""
import json
import mmap
import os
import time

from .errors import ConfigError

PROFILE_KEYS = ("pcie_gb_s", "pcie_h2d_gb_s", "pcie_d2h_gb_s", "gpu_tflops", "gpu_memory_bytes",
                "disk_read_gb_s", "disk_write_gb_s", "disk_gb_s", "disk_mixed_gb_s", "cpu_adam_gparams_s",
                "torch_adam_gparams_s",
                "mem_bw_gb_s", "cpu_memory_bytes", "nvme_paths", "probe_s")
QUEUE_DEPTHS = (1, 8, 32)


def load_profile(path):
    """A profile dict from JSON; raises ConfigError naming every bad key."""
    try:
        with open(path) as f:
            prof = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"--machine {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(prof, dict):
        raise ConfigError(f"--machine {path}: expected a JSON object with keys like {', '.join(PROFILE_KEYS[:4])}")
    bad = [k for k, v in prof.items() if k in PROFILE_KEYS and k != "nvme_paths"
           and v is not None and (not isinstance(v, (int, float)) or v <= 0)]
    if bad:
        raise ConfigError(f"--machine {path}: {', '.join(bad)} must be positive numbers or null")
    return prof


def _best(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def mem_bandwidth(nbytes, repeats=3):
    """GB/s of a torch copy_ between two host buffers (read + write counted), on torch's threads."""
    import torch
    a = torch.ones(nbytes // 4)
    b = torch.empty_like(a)
    return 2 * nbytes / _best(lambda: b.copy_(a), repeats) / 1e9


def adam_native_rate(numel, repeats=3):
    """Native AdamW (fp32 states, bf16 gradients and output) in 1e9 elements per second."""
    import torch
    from .adam import adamw_
    master, m, v = torch.randn(numel), torch.zeros(numel), torch.zeros(numel)
    grad, out = torch.randn(numel).bfloat16(), torch.empty(numel, dtype=torch.bfloat16)
    kw = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, step=1, out=out)
    adamw_(master, grad, m, v, **kw)   # first touch of the pages and the thread pool's start, untimed
    return numel / _best(lambda: adamw_(master, grad, m, v, **kw), repeats) / 1e9


def adam_rates(numel, repeats=3):
    """(native AdamW, torch fused AdamW) in 1e9 elements per second."""
    import torch
    native = adam_native_rate(numel, repeats)
    p = torch.nn.Parameter(torch.randn(numel))
    p.grad = torch.randn(numel)
    try:
        opt = torch.optim.AdamW([p], lr=1e-4, fused=True)
    except (RuntimeError, ValueError):
        opt = torch.optim.AdamW([p], lr=1e-4, foreach=False)
    opt.step()
    fused = numel / _best(opt.step, repeats) / 1e9
    return native, fused


def _timed_request(store, submit):
    """Seconds from submitting one request (submit() returns its ticket) to its completion: submit itself
    waits for queue slots, so most of the transfer happens inside it."""
    t0 = time.perf_counter()
    store.wait(submit())
    return time.perf_counter() - t0


def _random_pages(nbytes):
    buf = mmap.mmap(-1, nbytes)          # page-aligned, as O_DIRECT requires
    buf.write(os.urandom(1 << 20) * (nbytes >> 20))
    return buf


def _quiet_store(path, depth):
    """The store on one path; its warnings (tmpfs: no O_DIRECT) are the probe's rows to show, not warnings."""
    import warnings
    from .store import open_store
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return open_store([path], queue_depth=depth)


def _written_object(store, buf, nbytes):
    """A store object of nbytes whose blocks are already written once, as the engine's state files are after
    its setup: a first write into fresh (fallocated) blocks also converts their extents, which costs more than
    the steady state's overwrites and would understate the disk."""
    obj = store.create(nbytes)
    store.wait(store.submit_write(obj, 0, buf))
    return obj


def disk_rates(path, nbytes):
    """{depth: (read GB/s, write GB/s)} and whether O_DIRECT was used, through the store on one path, moved as
    the engine moves a unit's states: one request of nbytes that the store cuts into sub-requests with `depth`
    of them in flight (no Python per sub-request), overwriting written blocks. The file is removed before
    returning. Buffered I/O (no O_DIRECT) measures the page cache, not the disk."""
    buf = _random_pages(nbytes)
    out, direct = {}, None
    for depth in QUEUE_DEPTHS:
        with _quiet_store(path, depth) as store:
            direct = bool(store.direct[0])
            obj = _written_object(store, buf, nbytes)
            try:
                w = _timed_request(store, lambda: store.submit_write(obj, 0, buf))
                r = _timed_request(store, lambda: store.submit_read(obj, 0, buf))
            finally:
                store.remove(obj)
        out[depth] = (nbytes / r / 1e9, nbytes / w / 1e9)
    buf.close()
    return out, direct


def disk_mixed_rate(path, nbytes, depth=QUEUE_DEPTHS[-1]):
    """GB/s of reads and writes together: one read of nbytes and one write of nbytes submitted at once to a
    store of queue depth `depth` (the engine's), as a step that streams optimizer states reads one unit's
    states while it writes another's back; O_DIRECT where the filesystem allows."""
    import threading
    buf, sink = _random_pages(nbytes), mmap.mmap(-1, nbytes)
    with _quiet_store(path, depth) as store:
        src, dst = _written_object(store, buf, nbytes), _written_object(store, buf, nbytes)
        try:
            # submit() returns once all but the last sub-requests are queued, so the write is submitted from
            # a second thread, as the engine's optimizer thread writes while its prefetch reads
            done = []

            def write():
                try:
                    done.append(store.submit_write(dst, 0, buf))
                except BaseException as e:   # raised in this thread below, with its file, offset and errno
                    done.append(e)
            writer = threading.Thread(target=write)
            t0 = time.perf_counter()
            writer.start()
            try:
                store.wait(store.submit_read(src, 0, sink))
            finally:
                writer.join()   # the store and the files must outlive the write in flight
            if isinstance(done[0], BaseException):
                raise done[0]
            store.wait(done[0])
            sec = time.perf_counter() - t0
        finally:
            store.remove(src)
            store.remove(dst)
    buf.close()
    sink.close()
    return 2 * nbytes / sec / 1e9


def disk_profile(paths, nbytes):
    """(the profile's disk keys for the nvme paths, rates summed over them as the store stripes; the rows
    `offload probe` prints; whether O_DIRECT was used on the last path, None without paths). Without
    O_DIRECT the rates are the page cache's."""
    reads = writes = mixed = 0.0
    rows = []
    for path in paths:
        if not os.path.isdir(path):
            raise ConfigError(f"--nvme {path}: not a directory")
        by_depth, direct = disk_rates(path, nbytes)
        for depth, (r, w) in by_depth.items():
            rows.append((f"disk {path} qd {depth}{'' if direct else ' (buffered: page cache)'}",
                         f"read {r:.2f} GB/s, write {w:.2f} GB/s"))
        m = disk_mixed_rate(path, nbytes)
        rows.append((f"disk {path} reads and writes at once{'' if direct else ' (buffered: page cache)'}",
                     f"{m:.2f} GB/s together"))
        reads += max(r for r, _ in by_depth.values())
        writes += max(w for _, w in by_depth.values())
        mixed += m
    if not paths:
        return {}, rows, None
    return {"disk_read_gb_s": reads, "disk_write_gb_s": writes, "disk_gb_s": 2 / (1 / reads + 1 / writes),
            "disk_mixed_gb_s": mixed}, rows, direct


def gpu_rates(nbytes, n_mm, repeats=3):
    """(h2d, d2h, both-at-once GB/s, bf16 matmul TFLOPS, free bytes) on the current CUDA device."""
    import torch
    rates = (*pcie_rates(nbytes, repeats), matmul_tflops(n_mm, repeats))   # their buffers are gone by now
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    return (*rates, free)


def _timed_cuda(fn, repeats):
    import torch

    def run():
        fn()
        torch.cuda.synchronize()
    run()
    return _best(run, repeats)


def pcie_rates(nbytes, repeats=3):
    """(h2d, d2h, both-at-once) GB/s of pinned copies on the current CUDA device; takes 2 * nbytes there."""
    import torch
    dev = torch.device("cuda")
    host_a = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    host_b = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    d_a = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    d_b = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    h2d = nbytes / _timed_cuda(lambda: d_a.copy_(host_a, non_blocking=True), repeats) / 1e9
    d2h = nbytes / _timed_cuda(lambda: host_b.copy_(d_b, non_blocking=True), repeats) / 1e9

    def both():
        with torch.cuda.stream(s1):
            d_a.copy_(host_a, non_blocking=True)
        with torch.cuda.stream(s2):
            host_b.copy_(d_b, non_blocking=True)
    return h2d, d2h, 2 * nbytes / _timed_cuda(both, repeats) / 1e9


def matmul_tflops(n, repeats=3):
    """bf16 n x n matmul TFLOPS on the current CUDA device; takes 3 * 2 * n * n bytes there."""
    import torch
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(a)
    return 2 * n ** 3 * 4 / _timed_cuda(lambda: [torch.matmul(a, b, out=out) for _ in range(4)], repeats) / 1e12


def probe(nvme_paths=(), quick=False):
    """Measures this machine; returns (profile dict, table rows of (what, value))."""
    import psutil
    import torch
    t0 = time.perf_counter()
    rows = []
    prof = dict.fromkeys(PROFILE_KEYS)
    prof["nvme_paths"] = [os.path.abspath(p) for p in nvme_paths]
    prof["cpu_memory_bytes"] = psutil.virtual_memory().total
    prof["mem_bw_gb_s"] = mem_bandwidth((64 if quick else 512) << 20)
    rows.append(("host memory copy (read+write)", f"{prof['mem_bw_gb_s']:.1f} GB/s, {torch.get_num_threads()} threads"))
    native, fused = adam_rates((2 if quick else 16) << 20)
    prof["cpu_adam_gparams_s"], prof["torch_adam_gparams_s"] = native, fused
    rows.append(("AdamW native (bf16 grad/out)", f"{native:.3f} G elements/s"))
    rows.append(("AdamW torch fused (fp32)", f"{fused:.3f} G elements/s"))
    disk, disk_rows, _ = disk_profile(prof["nvme_paths"], (256 if quick else 1024) << 20)
    prof.update(disk)
    rows += disk_rows
    if torch.cuda.is_available():
        h2d, d2h, bidir, tflops, free = gpu_rates((64 if quick else 512) << 20, 4096 if quick else 8192)
        prof.update(pcie_h2d_gb_s=h2d, pcie_d2h_gb_s=d2h, pcie_gb_s=bidir, gpu_tflops=tflops, gpu_memory_bytes=free)
        rows += [("PCIe pinned h2d / d2h / both", f"{h2d:.1f} / {d2h:.1f} / {bidir:.1f} GB/s"),
                 ("GPU bf16 matmul", f"{tflops:.1f} TFLOPS"), ("GPU free memory", f"{free / 2**30:.2f} GiB")]
    else:
        rows.append(("GPU", "none (CUDA unavailable): gpu and pcie keys are null"))
    prof["probe_s"] = round(time.perf_counter() - t0, 1)
    return prof, rows
