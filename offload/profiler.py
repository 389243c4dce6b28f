"""Records the spans of a run (trace=PATH) and writes them as Chrome trace-event JSON (opens in Perfetto
and chrome://tracing), one lane per resource.

Native producers (the store's disk reads and writes, tagged with the unit) and Python (unit compute,
host<->device copies, optimizer updates, waits) write into one lock-free TraceRing on one clock
(CLOCK_MONOTONIC); this drains it at every flush. Compute and copy spans are host-side: on a GPU they show
when the host issued the work (CUDA-event timing is the timeline work's next step); "wait" spans are where
the host stalled on a transfer or an optimizer update, which on a GPU is where compute can starve.
"""
import json
import os
import threading
from contextlib import contextmanager

import torch

from . import _native

KINDS = {0: "compute", 1: "h2d", 2: "d2h", 3: "disk_read", 4: "disk_write", 5: "optim", 6: "wait",
         7: "act_swap_out", 8: "act_swap_in", 15: "other"}
LANES = {name: i for i, name in enumerate(KINDS.values())}


class Profiler:
    def __init__(self, path, capacity=1 << 18):
        self.path = os.fspath(path)
        self.ring = _native.TraceRing(capacity)
        self.names = {}          # unit tag -> name
        self.events = []
        self.lock = threading.Lock()
        self.t0 = _native.now_ns()

    def name_unit(self, tag, name):
        self.names[int(tag)] = name

    def record(self, kind, unit, nbytes, t_start):
        """One span from t_start (now_ns()) to now."""
        self.ring.record(kind, unit, nbytes, t_start, _native.now_ns())

    @contextmanager
    def span(self, kind, unit, nbytes=0):
        t = _native.now_ns()
        try:
            with torch.profiler.record_function(f"offload::{KINDS[kind]}"):
                yield
        finally:
            self.ring.record(kind, unit, nbytes, t, _native.now_ns())

    def flush(self):
        rows = self.ring.drain()
        with self.lock:
            self.events.extend(rows.tolist())
            events = list(self.events)
        out = []
        for kind, unit, nbytes, t0, t1 in events:
            name = KINDS.get(kind, "other")
            out.append({"name": f"{name} {self.names.get(unit, unit)}", "cat": name, "ph": "X",
                        "ts": (t0 - self.t0) / 1e3, "dur": max(t1 - t0, 0) / 1e3, "pid": 1, "tid": LANES[name],
                        "args": {"unit": self.names.get(unit, unit), "bytes": nbytes}})
        meta = [{"name": "thread_name", "ph": "M", "pid": 1, "tid": i, "args": {"name": n}} for n, i in LANES.items()]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"traceEvents": meta + out, "displayTimeUnit": "ms"}, f)
        os.replace(tmp, self.path)

    def close(self):
        self.flush()
