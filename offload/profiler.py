"""Records the spans of a run (trace=PATH) and writes them as Chrome trace-event JSON (opens in Perfetto
and chrome://tracing), one lane per resource.

Two clocks, one timeline. Host spans (waits, CPU optimizer updates, and every span of a run on the CPU)
and the native store's disk reads and writes (tagged with their unit) go into one lock-free TraceRing on
CLOCK_MONOTONIC (now_ns()). On a GPU, unit compute and host<->device copies are timed on the device: a
pair of CUDA events on the stream that does the work (device_timer.DeviceTimer, Note [device clock]),
read at each step boundary and placed on the host clock. A device "wait" is the time the compute stream
spent blocked on a copy's event; a host "wait" is where the host stalled (on a disk read or an optimizer
update) before it could issue more work.

Note [profiler ranges]: each span is also a torch.profiler range named offload::<kind> (the unit's name in
its args), so it appears in a torch.profiler trace beside the kernels it issued. A range is opened only
while a torch profiler is running (one C call to check), so tracing without one costs nothing more. The
ranges mark when the host issued the work; the device-timed spans above are in this trace. The optimizer's
worker thread and the store's disk requests issued there (optim, disk_write) show in torch's trace when its
profiler records every thread: profile(experimental_config=_ExperimentalConfig(profile_all_threads=True)).

Note [wait causes]: a wait's cause travels in the kind's upper bits (kind | cause << 8), so the ring and
its binding stay five integers per event; flush() splits them again. A compute span's phase (forward or
backward, recompute included) travels the same way.
"""
import bisect
import json
import os
import queue
import threading
import warnings
from contextlib import contextmanager

import torch

from . import _native
from .device_timer import DeviceTimer

KINDS = {0: "compute", 1: "h2d", 2: "d2h", 3: "disk_read", 4: "disk_write", 5: "optim", 6: "wait",
         7: "act_swap_out", 8: "act_swap_in", 15: "other"}
LANES = {name: i for i, name in enumerate(KINDS.values())}
KIND_WAIT = _native.trace_kind.WAIT
# Note [wait causes]: what a wait waited on.
WAIT_ON = {1: "disk_read", 2: "h2d", 3: "optim"}
WAIT_DISK, WAIT_H2D, WAIT_OPTIM = (KIND_WAIT | c << 8 for c in WAIT_ON)
# A compute span's phase travels the same way (compute | phase << 8; Note [wait causes]).
COMPUTE_PHASE = {1: "forward", 2: "backward"}
KIND_FORWARD, KIND_BACKWARD = (_native.trace_kind.COMPUTE | c << 8 for c in COMPUTE_PHASE)
# Lane titles on a GPU, where these kinds are timed on the device's streams.
# A device wait this short is the events' own resolution, not a stall: not written.
WAIT_FLOOR_NS = 5_000
GPU_LANES = {"compute": "gpu compute", "h2d": "gpu h2d (copy stream)", "d2h": "gpu d2h (copy stream)",
             "act_swap_out": "gpu act_swap_out (copy stream)", "act_swap_in": "gpu act_swap_in"}

_now = _native.now_ns
_torch_profiler_state = torch.autograd.profiler   # its _is_profiler_enabled: set while any torch profiler runs


def _profiling():
    """Whether a torch profiler runs, on any thread. torch's own per-thread flag is false on the
    optimizer's worker thread, and on every thread under profile_all_threads, where ranges are still
    recorded (Note [profiler ranges])."""
    return _torch_profiler_state._is_profiler_enabled


_range_enter = torch.ops.profiler._record_function_enter_new
_range_exit = torch.ops.profiler._record_function_exit


class _Range:
    """A span's start while a torch profiler runs: the start it wraps and the open range (Note [profiler
    ranges])."""
    __slots__ = ("start", "handle")

    def __init__(self, start, handle):
        self.start, self.handle = start, handle

    def close(self):
        _range_exit(self.handle)
        return self.start


class _Appender:
    """A thread that writes `head` (a document cut inside its open event array) to path, then appends each
    list of span rows put on its queue, formatted by fmt (Note [trace of a killed run]). A failed write
    (a full disk) stops the appending with a warning; training goes on, and close() tries the whole file."""

    def __init__(self, path, head, fmt):
        self.queue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, args=(path, head, fmt), name="offload-trace", daemon=True)
        self.thread.start()

    def _run(self, path, head, fmt):
        try:
            with open(path, "w") as f:
                f.write(head)
                f.flush()
                while (rows := self.queue.get()) is not None:
                    f.write("".join(",\n" + json.dumps(fmt(*row)) for row in rows))
                    f.flush()
        except Exception as e:   # a full disk, or a span that does not format: training goes on
            warnings.warn(f"trace: appending to {path} failed ({e}); the trace is written whole at close()")
            while self.queue.get() is not None:   # drain until finish()
                pass

    def finish(self):
        self.queue.put(None)
        self.thread.join()


class Profiler:
    """device: torch.device of the run; on CUDA compute and copies are timed on the device. plan: the
    engine's Plan, whose prediction goes into the trace's metadata at each flush."""

    def __init__(self, path, capacity=1 << 18, device=None, plan=None):
        self.path = os.fspath(path)
        self.ring = _native.TraceRing(capacity)
        self.names = {}          # unit tag -> name
        self.tiers = {}          # unit tag -> (params tier, states tier)
        self.events = []         # (kind, unit, bytes, t0, t1, clock), clock "host" or "gpu"
        self.marks = []          # (now_ns, step): where each step began
        self.lock = threading.Lock()
        self.appender = None     # appends spans to the file at step boundaries, until a flush()
        self.written = 0         # how many of self.events went to the appender
        self.plan = plan
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.timer = None
        if self.device.type == "cuda":
            dev = self.device
            self.timer = DeviceTimer(self._emit_device, lambda: torch.cuda.Event(enable_timing=True),
                                     lambda: torch.cuda.synchronize(dev), lambda: torch.cuda.current_stream(dev))
        self.t0 = _now()

    def name_unit(self, tag, name, params=None, states=None):
        """params, states: the unit's tiers ("gpu", "cpu", "nvme"), shown with its spans."""
        self.names[int(tag)] = name
        self.tiers[int(tag)] = (params, states)

    # ---- the hot path: a start, then one call at the end ---------------------------------------------------
    def begin(self, kind, unit=None):
        """The start of a host-clock span, for record()."""
        if _profiling():
            return _Range(_now(), self._open_range(kind, unit))
        return _now()

    def record(self, kind, unit, nbytes, t_start):
        """One host-clock span from t_start (begin() or now_ns()) to now."""
        if t_start.__class__ is _Range:
            t_start = t_start.close()
        self.ring.record(kind, unit, nbytes, t_start, _now())

    def begin_work(self, kind, unit=None, stream=None):
        """The start of work on the compute device, for end_work(): on CUDA an event on stream (None: the
        current stream), else a host time."""
        start = self.timer.begin(stream) if self.timer is not None else _now()
        if _profiling():
            return _Range(start, self._open_range(kind, unit))
        return start

    def end_work(self, token, kind, unit, nbytes=0, stream=None):
        if token.__class__ is _Range:
            token = token.close()
        if self.timer is not None:
            self.timer.end(token, kind, unit, nbytes, stream)
        else:
            self.ring.record(kind, unit, nbytes, token, _now())

    @contextmanager
    def issuing(self, kind, unit):
        """Work that another clock times (the store's disk requests, whose spans its ring records): only
        the torch.profiler range of issuing it, while a torch profiler runs (Note [profiler ranges])."""
        if not _profiling():
            yield
            return
        handle = self._open_range(kind, unit)
        try:
            yield
        finally:
            _range_exit(handle)

    @contextmanager
    def span(self, kind, unit, nbytes=0):
        t = self.begin(kind, unit)
        try:
            yield
        finally:
            self.record(kind, unit, nbytes, t)

    def mark_step(self, step):
        """A step begins now: later spans carry it as args.step. Reads the device spans that completed and
        appends every span collected so far to the file (Note [trace of a killed run])."""
        self.marks.append((_now(), step))
        if self.timer is not None:
            self.timer.resolve()
        self._append_collected()

    def _collect(self):
        """Moves the ring's spans into self.events; the caller holds self.lock."""
        self.events.extend((*row, "host") for row in self.ring.drain().tolist())

    def _head(self):
        """The document up to and into its event array: metadata first, so a reader of a file cut anywhere
        after it still has the plan and the lanes."""
        gpu = self.timer is not None
        meta = [{"name": "process_name", "ph": "M", "pid": 1, "tid": 0, "args": {"name": "offload"}}]
        meta += [{"name": "thread_name", "ph": "M", "pid": 1, "tid": i,
                  "args": {"name": GPU_LANES.get(n, n) if gpu else n}} for n, i in LANES.items()]
        return {"otherData": {"offload": self.metadata()}, "displayTimeUnit": "ms", "traceEvents": meta}

    def _append_collected(self):
        """Note [trace of a killed run]: close() writes the whole trace at the end, but a run killed before
        it (out of memory, a signal, a crash) would leave nothing. So at every step boundary the spans
        collected since the last one go to an appender thread, which adds them to an open document: its
        event array stays open until close() replaces the file with the complete one, and the timeline
        reads such a cut file up to its last whole event. Formatting and writing a step's few hundred spans
        takes milliseconds of Python, so it is off the training thread."""
        with self.lock:
            self._collect()
            if self.appender is None:   # the first boundary, or the first after a flush(): every span again
                head = json.dumps(self._head())
                self.appender, self.written = _Appender(self.path, head[:head.rindex("]")], self._event), 0
            rows, self.written = self.events[self.written:], len(self.events)
        if rows:
            self.appender.queue.put(rows)

    def _open_range(self, kind, unit):
        """A torch.profiler range offload::<kind> with the unit's name (Note [profiler ranges])."""
        return _range_enter(f"offload::{KINDS[kind & 0xff]}", self._name(unit))

    def _name(self, unit):
        return "" if unit is None else str(self.names.get(unit, unit))

    def _emit_device(self, kind, unit, nbytes, t0, t1):
        if kind & 0xff == KIND_WAIT and t1 - t0 < WAIT_FLOOR_NS:
            return
        self.events.append((kind, unit, nbytes, t0, t1, "gpu"))

    # ---- writing ---------------------------------------------------------------------------------------------
    def flush(self, wait=False):
        """Writes the trace so far (atomically: a reader sees the old file or the new one). wait: first let
        every device span complete (a synchronize; close() does this)."""
        with self.lock:
            if self.timer is not None:
                if wait:
                    torch.cuda.synchronize(self.device)
                self.timer.resolve(wait=wait)
            self._collect()
            events = list(self.events)
            if self.appender is not None:   # the complete document replaces the open one
                self.appender.finish()
                self.appender = None
        doc = self._head()
        doc["traceEvents"] += [self._event(*row) for row in events]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, self.path)

    def _event(self, kind, unit, nbytes, t0, t1, clock):
        base, cause = kind & 0xff, kind >> 8
        name = KINDS.get(base, "other")
        uname = self.names.get(unit, unit)
        args = {"unit": uname, "bytes": nbytes, "tier": self._tier(name, unit, cause), "clock": clock}
        if name == "wait" and cause in WAIT_ON:
            args["on"] = WAIT_ON[cause]
        elif name == "compute" and cause in COMPUTE_PHASE:
            args["phase"] = COMPUTE_PHASE[cause]
        i = bisect.bisect_right(self.marks, (t0, float("inf"))) - 1
        if i >= 0:
            args["step"] = self.marks[i][1]
        return {"name": f"{name} {uname}", "cat": name, "ph": "X", "ts": (t0 - self.t0) / 1e3,
                "dur": max(t1 - t0, 0) / 1e3, "pid": 1, "tid": LANES[name], "args": args}

    def _tier(self, kind, unit, cause):
        """The tier a span touches: where a copy came from or went, where a unit's states are updated, what
        a wait waited on (Note [wait causes])."""
        params, states = self.tiers.get(unit, (None, None))
        if kind in ("disk_read", "disk_write"):
            return "nvme"
        if kind in ("d2h", "act_swap_out", "act_swap_in"):
            return "cpu"
        if kind == "compute":
            return "gpu" if self.device.type == "cuda" else "cpu"
        if kind == "h2d":
            return params
        if kind == "optim":
            return states
        if kind == "wait":
            return {"disk_read": "nvme", "h2d": params, "optim": states}.get(WAIT_ON.get(cause))
        return None

    def metadata(self):
        """What the timeline needs beside the spans: the plan's prediction and the units' tiers."""
        meta = {"device": str(self.device), "clock": "gpu events for compute and copies" if self.timer else "host",
                "dropped": self.ring.dropped,
                "units": {str(self.names.get(t, t)): {"params": p, "states": s} for t, (p, s) in self.tiers.items()}}
        p = self.plan
        if p is not None and p.predicted_step_s is not None:
            meta["plan"] = {"predicted_step_s": p.predicted_step_s, "bottleneck": p.bottleneck,
                            "resource_s": dict(p.resource_s), "compute_included": bool(p.compute_included)}
        return meta

    def close(self):
        self.flush(wait=True)
