"""Device-side timing of spans: when the GPU actually ran a unit's compute or a copy, not when the host
issued it. A span is a pair of timing events recorded on the stream that does the work; they are read
later, never on the hot path, and converted to the host clock (now_ns(), CLOCK_MONOTONIC) the rest of the
trace uses.

Note [device clock]: CUDA events only give differences of device time (elapsed_time, in float32 ms). One
synchronize at trace start pins an anchor event to a host timestamp; a span's start is then the anchor's
host time plus elapsed_time(anchor, start), and its length elapsed_time(start, end). float32 ms loses a
microsecond per ~17 s of distance, so the anchor is chained forward: every REANCHOR_NS of host time a new
anchor event is recorded (no synchronize), and once it has completed its host time is derived from the
previous anchor's. Spans are measured from the anchor that was current when they began, so no elapsed
time is ever negative. What remains is the rate difference of the two clocks (parts per million): device
spans may drift from host spans by a few milliseconds per hour of trace.

Note [event pool]: events are taken from a free list and returned when their span has been read, so the
steady state allocates nothing; the pool grows to the number of spans in flight (about two steps' worth,
since spans are read at each step boundary) and stops there.
"""
import threading

from ._native import now_ns

REANCHOR_NS = 10_000_000_000   # chain a new anchor this often (Note [device clock])


class _Anchor:
    __slots__ = ("event", "ns", "prev")

    def __init__(self, event, ns, prev):
        self.event, self.ns, self.prev = event, ns, prev

    def host_ns(self):
        """The anchor's host time, derived along the chain once its event has completed."""
        if self.ns is None:
            p = self.prev
            self.ns = p.host_ns() + int(p.event.elapsed_time(self.event) * 1e6)
            self.prev = None   # the chain behind a resolved anchor is no longer needed
        return self.ns


class DeviceTimer:
    """Times spans on device streams. emit(kind, unit, nbytes, t_start_ns, t_end_ns) receives each span
    once its events have completed, on the thread that calls resolve(). new_event() makes a timing event
    (torch.cuda.Event(enable_timing=True) on a GPU; tests pass stand-ins); current_stream() is the
    run's device's current stream (events of one timer must all be on one device: elapsed_time compares
    them). Thread-safe: spans may begin and end on the optimizer thread while the main thread resolves."""

    def __init__(self, emit, new_event, synchronize, current_stream):
        self.emit, self.new_event, self.current_stream = emit, new_event, current_stream
        self.lock = threading.Lock()
        self.free = []
        self.pending = []     # (kind, unit, nbytes, start event, end event, anchor)
        self.created = 0
        synchronize()         # the device is idle: the anchor runs as soon as it is issued
        ev = self._take()
        t = now_ns()
        ev.record(current_stream())
        synchronize()
        self.anchor = _Anchor(ev, t, None)
        self.next_anchor = None

    def _take(self):
        if self.free:
            return self.free.pop()
        self.created += 1
        return self.new_event()

    def begin(self, stream=None):
        """Records a start event on stream (None: the current stream); returns what end() takes."""
        with self.lock:
            ev = self._take()
            anchor = self.anchor
        ev.record(stream if stream is not None else self.current_stream())
        return ev, anchor

    def end(self, token, kind, unit, nbytes, stream=None):
        with self.lock:
            ev = self._take()
        ev.record(stream if stream is not None else self.current_stream())
        start, anchor = token
        with self.lock:
            self.pending.append((kind, unit, nbytes, start, ev, anchor))

    def resolve(self, wait=False):
        """Emits every span whose events have completed (all of them after a synchronize when wait), and
        returns their events to the pool. Cheap when called at step boundaries: one query per span."""
        with self.lock:
            pending, self.pending = self.pending, []
        keep, done = [], []
        for span in pending:
            kind, unit, nbytes, start, end, anchor = span
            if not wait and not end.query():
                keep.append(span)
                continue
            t0 = anchor.host_ns() + int(anchor.event.elapsed_time(start) * 1e6)
            t1 = t0 + max(0, int(start.elapsed_time(end) * 1e6))
            self.emit(kind, unit, nbytes, t0, t1)
            done += (start, end)
        with self.lock:
            self.pending[:0] = keep   # spans begun meanwhile stay after the older ones
            self.free += done
            self._chain_anchor()

    def _chain_anchor(self):
        """Note [device clock]: make a completed successor the current anchor; start one when it is due."""
        nxt = self.next_anchor
        if nxt is not None and nxt.event.query():
            nxt.host_ns()
            self.anchor, self.next_anchor = nxt, None
        elif nxt is None and now_ns() - self.anchor.ns > REANCHOR_NS:
            ev = self._take()
            ev.record(self.current_stream())
            self.next_anchor = _Anchor(ev, None, self.anchor)
