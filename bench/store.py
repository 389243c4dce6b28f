"""Store throughput: 1 MiB sequential and random reads and writes through offload's store (io_uring and
thread-pool backends) beside a plain O_DIRECT os.pwrite/os.preadv Python thread pool, at the same queue depths,
in one run on one directory. Prints a table and records one row per measurement (bench="store").

    python bench/store.py [--dir DIR] [--gib 4] [--depths 1,4,16,32,64]
"""
import argparse
import concurrent.futures as cf
import mmap
import os
import shutil
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from record import record  # noqa: E402

from offload import _native  # noqa: E402
from offload.store import open_store  # noqa: E402

MIB = 1 << 20


def block_order(nblocks, pattern, seed=0):
    if pattern == "seq":
        return np.arange(nblocks)
    return np.random.default_rng(seed).permutation(nblocks)


def run_store(store, obj, bufs, op, order):
    """Keeps len(bufs) 1 MiB requests in flight, oldest waited first; returns seconds."""
    depth = len(bufs)
    submit = store.submit_write if op == "write" else store.submit_read
    inflight = []
    t0 = time.perf_counter()
    for i, blk in enumerate(order):
        if len(inflight) == depth:
            store.wait(inflight.pop(0))
        inflight.append(submit(obj, int(blk) * MIB, bufs[i % depth]))
    for t in inflight:
        store.wait(t)
    return time.perf_counter() - t0


def run_raw(fd, pool, bufs, op, order):
    depth = len(bufs)
    if op == "write":
        fn = lambda b, off: os.pwrite(fd, b, off)
    else:
        fn = lambda b, off: os.preadv(fd, [b], off)
    inflight = []
    t0 = time.perf_counter()
    for i, blk in enumerate(order):
        if len(inflight) == depth:
            n = inflight.pop(0).result()
            if n != MIB:
                raise OSError(f"short {op}: {n} bytes")
        inflight.append(pool.submit(fn, bufs[i % depth], int(blk) * MIB))
    for f in inflight:
        f.result()
    return time.perf_counter() - t0


def aligned_buffers(depth):
    """depth page-aligned 1 MiB buffers carved from one anonymous mapping (so one registration covers all)."""
    m = mmap.mmap(-1, depth * MIB)
    arr = np.frombuffer(m, dtype=np.uint8)
    arr[:] = np.random.default_rng(1).integers(0, 256, arr.size, dtype=np.uint8)
    return m, arr, [memoryview(m)[i * MIB:(i + 1) * MIB] for i in range(depth)]


def bench_store(directory, backend, depth, nblocks, results):
    m, arr, bufs = aligned_buffers(depth)
    try:
        with open_store(directory, backend=backend, queue_depth=depth, direct="on") as s:
            registered = s.register_buffer(arr)
            obj = s.create(nblocks * MIB)
            for op in ("write", "read"):
                for pattern in ("seq", "rand"):
                    sec = run_store(s, obj, bufs, op, block_order(nblocks, pattern))
                    results.append(dict(system=f"offload-{backend}", op=op, pattern=pattern, depth=depth,
                                        gb_per_s=nblocks * MIB / sec / 1e9, fixed_buffers=registered))
    finally:
        bufs.clear()
        del arr
        m.close()


def bench_raw(directory, depth, nblocks, results):
    path = os.path.join(directory, f"raw-{os.getpid()}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o600)
    m, arr, bufs = aligned_buffers(depth)
    try:
        os.posix_fallocate(fd, 0, nblocks * MIB)
        with cf.ThreadPoolExecutor(max_workers=depth) as pool:
            for op in ("write", "read"):
                for pattern in ("seq", "rand"):
                    sec = run_raw(fd, pool, bufs, op, block_order(nblocks, pattern))
                    results.append(dict(system="raw-pread", op=op, pattern=pattern, depth=depth,
                                        gb_per_s=nblocks * MIB / sec / 1e9))
    finally:
        bufs.clear()
        del arr
        m.close()
        os.close(fd)
        os.unlink(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", help="directory to benchmark (default: a temp dir under the current directory)")
    ap.add_argument("--gib", type=float, default=4.0, help="bytes moved per measurement, GiB")
    ap.add_argument("--depths", default="1,4,16,32,64")
    ap.add_argument("--reps", type=int, default=3,
                    help="interleaved repetitions (raw, io_uring, thread pool in turn); medians are reported, so "
                         "a virtual disk's drift hits every system alike")
    ap.add_argument("--no-record", action="store_true", help="print only; do not append to results")
    args = ap.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    nblocks = max(1, int(args.gib * 1024))
    tmp = None
    directory = args.dir
    if directory is None:
        directory = tmp = tempfile.mkdtemp(prefix="offload-bench-store-", dir=os.getcwd())
    probe = _native.probe_direct(directory)
    if not probe["direct"]:
        sys.exit(f"{directory}: {probe['reason']}; the benchmark compares O_DIRECT paths")
    samples = []
    try:
        for rep in range(args.reps):
            for depth in depths:
                bench_raw(directory, depth, nblocks, samples)
                for backend in _native.store_backends():
                    bench_store(directory, backend, depth, nblocks, samples)
                print(f"rep {rep} depth {depth} done", file=sys.stderr, flush=True)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    groups = {}
    for r in samples:
        groups.setdefault((r["system"], r["op"], r["pattern"], r["depth"]), []).append(r)
    results = []
    for (system, op, pattern, depth), rs in groups.items():
        rates = sorted(x["gb_per_s"] for x in rs)
        row = dict(rs[0], gb_per_s=rates[len(rates) // 2], samples=[round(x, 3) for x in rates])
        results.append(row)
    best_raw = {}
    for r in results:
        if r["system"] == "raw-pread":
            key = (r["op"], r["pattern"])
            best_raw[key] = max(best_raw.get(key, 0.0), r["gb_per_s"])
    print(f"{'system':<20}{'op':<7}{'pattern':<8}{'depth':>6}{'GB/s':>9}{'x best raw':>12}")
    for r in results:
        r["ratio"] = r["gb_per_s"] / best_raw[(r["op"], r["pattern"])]
        print(f"{r['system']:<20}{r['op']:<7}{r['pattern']:<8}{r['depth']:>6}{r['gb_per_s']:>9.3f}{r['ratio']:>12.2f}")
        if not args.no_record:
            record(dict(bench="store", **r, gib=args.gib, alignment=probe["alignment"]))


if __name__ == "__main__":
    main()
