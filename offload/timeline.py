"""The swap timeline: reads a trace written by offload.profiler (Chrome trace-event JSON) and says where a
run's time went: how busy each resource lane was, what each link moved, how long compute stalled and on
what, and which lane is the bottleneck. `offload timeline` prints this and draws it (timeline_render).

Only complete ("X") events are read; "B"/"E" pairs and counters are ignored, since the profiler writes
none. A trace cut short by a killed run is read up to its last complete event. The profiler's metadata
(otherData.offload: the plan's prediction, the units' tiers) is read by load_meta; the summary then sets
the plan's predicted seconds per resource beside the measured ones.
"""
import json
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass

from .errors import ConfigError
from .profiler import LANES

# Links whose spans carry bytes moved; their rate is reported per link.
LINKS = ("h2d", "d2h", "disk_read", "disk_write")
# Lanes that are not a resource: waiting is the symptom, not the bottleneck.
NOT_RESOURCES = ("wait", "other")
TOP_CAUSES = 5
STEP_ROWS = 20   # per-step rows printed; a long run's middle steps are elided
# The plan's resources (plan.py, Note [step-time model]) and the lanes whose busy time measures each.
# PCIe is priced as one rate for both directions, so its lanes are counted together.
RESOURCE_LANES = {"gpu": ("compute",), "pcie": ("h2d", "d2h", "act_swap_out", "act_swap_in"),
                  "disk": ("disk_read", "disk_write"), "cpu_adam": ("optim",)}


@dataclass(frozen=True)
class Span:
    """One complete trace event, in seconds from the trace's clock origin."""
    kind: str
    unit: str
    start: float
    end: float
    bytes: int
    step: object  # args.step when the producer sets it, else None
    tier: object = None    # args.tier: the tier a copy or update touched, or what a wait waited on
    clock: object = None   # args.clock: "gpu" for spans timed on the device, else host
    on: object = None      # args.on for waits: "disk_read", "h2d" or "optim"

    @property
    def dur(self):
        return self.end - self.start


# -- reading ---------------------------------------------------------------------------------------------

def load_trace(path):
    """The events of a trace file (a {"traceEvents": [...]} object or a bare JSON array). A file cut
    mid-way (a killed run) yields every event that was written completely. Raises ConfigError when the
    file is missing, is not a trace, or holds no complete ("X") events."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read trace {path}: {e.strerror or e}") from None
    try:
        doc = json.loads(text)
        events = doc.get("traceEvents") if isinstance(doc, dict) else doc
    except json.JSONDecodeError:
        events = _salvage(text)
    if not isinstance(events, list):
        raise ConfigError(f"{path} is not a trace: expected a JSON array or an object with 'traceEvents'")
    events = [e for e in events if isinstance(e, dict)]
    if not any(e.get("ph") == "X" for e in events):
        raise ConfigError(f"{path} holds no complete ('X') trace events; was the run started with trace=...?")
    return events


def load_meta(path):
    """The profiler's metadata (otherData.offload) of a trace file, or {} when it has none. The profiler
    writes it before the events, so a truncated trace keeps it."""
    try:
        with open(os.fspath(path), encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return {}
    try:
        doc = json.loads(text)
        other = doc.get("otherData") if isinstance(doc, dict) else None
    except json.JSONDecodeError:
        m = re.search(r'"otherData"\s*:\s*', text)
        try:
            other = json.JSONDecoder().raw_decode(text, m.end())[0] if m else None
        except json.JSONDecodeError:
            other = None
    meta = other.get("offload") if isinstance(other, dict) else None
    return meta if isinstance(meta, dict) else {}


def _salvage(text):
    """Complete events from a truncated trace: decode one object at a time from the start of the event
    array and stop at the first that does not parse (the one the writer was cut in). None when the text
    has no event array to start from."""
    m = re.match(r"\s*\[", text) or re.search(r'"traceEvents"\s*:\s*\[', text)
    if m is None:
        return None
    decoder = json.JSONDecoder()
    events, i = [], m.end()
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text) or text[i] == "]":
            return events
        try:
            ev, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return events
        events.append(ev)


def spans(events):
    """The complete events as Spans, sorted by start. Malformed events (no numeric ts/dur) are skipped
    rather than failing a whole report."""
    out = []
    for e in events:
        if e.get("ph") != "X" or not _is_num(e.get("ts")) or not _is_num(e.get("dur")):
            continue
        args = e.get("args") if isinstance(e.get("args"), dict) else {}
        kind = e.get("cat") or str(e.get("name", "other")).split(" ")[0] or "other"
        unit = args.get("unit", str(e.get("name", "")).partition(" ")[2])
        nbytes = args.get("bytes", 0)
        start = e["ts"] / 1e6
        out.append(Span(str(kind), str(unit), start, start + max(e["dur"], 0) / 1e6,
                        int(nbytes) if _is_num(nbytes) else 0, args.get("step"), args.get("tier"),
                        args.get("clock"), args.get("on")))
    out.sort(key=lambda s: (s.start, s.end))
    return out


def _is_num(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def lane_order(kinds):
    """The profiler's lane order for known kinds, then unknown ones alphabetically."""
    return sorted(set(kinds), key=lambda k: (LANES.get(k, len(LANES)), k))


def steps_of(sp):
    """The distinct args.step values present, sorted; empty when no event carries one."""
    return sorted({s.step for s in sp if s.step is not None}, key=_step_key)


def group_by_step(sp):
    """args.step -> that step's spans, in step order, in one pass (a long run has thousands of steps)."""
    groups = defaultdict(list)
    for s in sp:
        if s.step is not None:
            groups[s.step].append(s)
    return {st: groups[st] for st in sorted(groups, key=_step_key)}


def _step_key(step):
    return (0, step, "") if _is_num(step) else (1, 0, str(step))


def select_step(sp, step):
    """The spans of one step; ConfigError naming the steps present when there is no such step."""
    present = steps_of(sp)
    chosen = [s for s in sp if s.step is not None and str(s.step) == str(step)]
    if not chosen:
        have = ", ".join(map(str, present)) if present else "none (the trace's events carry no args.step)"
        raise ConfigError(f"--step {step}: no events for that step; steps in the trace: {have}")
    return chosen


# -- summarising -----------------------------------------------------------------------------------------

def merge(intervals):
    """The union of (start, end) intervals as sorted, disjoint intervals. Overlapping spans in one lane
    (several threads on one link) must count once, or a lane could be more than 100% busy."""
    out = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            if b > out[-1][1]:
                out[-1][1] = b
        else:
            out.append([a, b])
    return [tuple(x) for x in out]


def union_length(intervals):
    return sum(b - a for a, b in merge(intervals))


def summarize(events, meta=None):
    """Where the traced time went, as a dict:
    span_s: first start to last end;
    lanes: kind -> {busy_s, busy_pct, spans} (busy = union of the lane's spans);
    links: h2d/d2h/disk_read/disk_write -> {bytes, busy_s, gb_per_s (over busy time), avg_gb_per_s (over the span)};
    stall: {total_s (sum of wait spans), pct, top: [{unit, tier, on, seconds, count}] by seconds};
    bottleneck: the busiest resource lane (wait and other excluded), or None;
    steps: args.step -> the same summary for that step's spans (absent when no event carries a step);
    plan: with meta (load_meta) holding the plan's prediction, compare_plan()'s dict."""
    sp = events if events and isinstance(events[0], Span) else spans(events)
    out = _summarize_spans(sp)
    by_step = group_by_step(sp)
    if by_step:
        out["steps"] = {st: _summarize_spans(one) for st, one in by_step.items()}
    if meta and meta.get("plan"):
        out["plan"] = compare_plan(meta["plan"], sp, by_step)
    return out


def resource_busy(sp):
    """Seconds each plan resource was busy in sp: the union of its lanes' spans. Optimizer spans timed on
    the device are GPU work, not CPU AdamW."""
    out = {}
    for res, lanes in RESOURCE_LANES.items():
        mine = [s for s in sp if s.kind in lanes and not (res == "cpu_adam" and s.clock == "gpu")]
        if res == "gpu":
            mine += [s for s in sp if s.kind == "optim" and s.clock == "gpu"]
        out[res] = union_length((s.start, s.end) for s in mine)
    return out


def compare_plan(plan, sp, by_step=None):
    """The plan's prediction beside the measurement: per resource predicted seconds per step and measured
    busy seconds per step, and the step time. Per step means the median over the trace's steps; without
    steps, the whole trace counts as one. A step with work still in flight at its end (the last one of a
    trace cut short) is not told apart: medians keep one outlier from moving the figure."""
    by_step = group_by_step(sp) if by_step is None else by_step
    views = list(by_step.values()) or [sp]
    busy = [resource_busy(one) for one in views]
    spans_s = [max(s.end for s in one) - min(s.start for s in one) for one in views]
    resources = {}
    for res, predicted in (plan.get("resource_s") or {}).items():
        measured = _median([b.get(res, 0.0) for b in busy])
        resources[res] = {"predicted_s": predicted, "measured_s": measured}
    measured_step = _median(spans_s)
    bottleneck = max(resources, key=lambda r: resources[r]["measured_s"]) if resources else None
    return {"predicted_step_s": plan.get("predicted_step_s"), "measured_step_s": measured_step,
            "steps": len(views) if by_step else 0, "bottleneck_predicted": plan.get("bottleneck"),
            "bottleneck_measured": bottleneck, "compute_included": bool(plan.get("compute_included")),
            "resources": resources}


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    if not n:
        return 0.0
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def _summarize_spans(sp):
    if not sp:
        return {"span_s": 0.0, "start_s": 0.0, "lanes": {}, "links": {}, "bottleneck": None,
                "stall": {"total_s": 0.0, "pct": 0.0, "top": []}}
    t0, t1 = min(s.start for s in sp), max(s.end for s in sp)
    total = t1 - t0
    by_kind = defaultdict(list)
    for s in sp:
        by_kind[s.kind].append(s)
    lanes = {}
    for kind in lane_order(by_kind):
        busy = union_length((s.start, s.end) for s in by_kind[kind])
        lanes[kind] = {"busy_s": busy, "busy_pct": _pct(busy, total), "spans": len(by_kind[kind])}
    links = {k: _link(by_kind[k], lanes[k]["busy_s"], total) for k in LINKS if k in by_kind}
    resources = {k: v["busy_s"] for k, v in lanes.items() if k not in NOT_RESOURCES}
    bottleneck = max(resources, key=resources.get) if resources else None
    return {"span_s": total, "start_s": t0, "lanes": lanes, "links": links, "bottleneck": bottleneck,
            "stall": _stall(by_kind.get("wait", []), total)}


def _link(sp, busy, total):
    nbytes = sum(s.bytes for s in sp)
    return {"bytes": nbytes, "busy_s": busy, "gb_per_s": nbytes / busy / 1e9 if busy > 0 else 0.0,
            "avg_gb_per_s": nbytes / total / 1e9 if total > 0 else 0.0}


def _stall(waits, total):
    """A cause is (unit, tier, what was waited on): "layers.3 nvme disk_read" says which transfer to speed
    up or start earlier."""
    by_cause = defaultdict(lambda: [0.0, 0])
    for s in waits:
        c = by_cause[(s.unit, s.tier, s.on)]
        c[0] += s.dur
        c[1] += 1
    top = sorted(by_cause.items(), key=lambda kv: (-kv[1][0], tuple(str(x) for x in kv[0])))[:TOP_CAUSES]
    stalled = sum(s.dur for s in waits)
    return {"total_s": stalled, "pct": _pct(stalled, total),
            "top": [{"unit": u, "tier": tier, "on": on, "seconds": sec, "count": n}
                    for (u, tier, on), (sec, n) in top]}


def _pct(part, whole):
    return 100.0 * part / whole if whole > 0 else 0.0


# -- text ------------------------------------------------------------------------------------------------

def format_summary(summary):
    """The summary as a plain-text report: a lane table, a link table, stalls, and a per-step table."""
    lines = [f"traced span {_fmt_s(summary['span_s'])}; bottleneck: {summary['bottleneck'] or 'none'}", "",
             f"{'lane':<14}{'busy':>12}{'busy %':>9}{'spans':>9}"]
    for kind, v in summary["lanes"].items():
        lines.append(f"{kind:<14}{_fmt_s(v['busy_s']):>12}{v['busy_pct']:>8.1f}%{v['spans']:>9}")
    if summary["links"]:
        lines += ["", f"{'link':<14}{'moved':>12}{'GB/s busy':>11}{'GB/s avg':>10}"]
        for kind, v in summary["links"].items():
            lines.append(f"{kind:<14}{_fmt_gb(v['bytes']):>12}{v['gb_per_s']:>11.2f}{v['avg_gb_per_s']:>10.2f}")
    stall = summary["stall"]
    lines += ["", f"stalled {_fmt_s(stall['total_s'])} ({stall['pct']:.1f}% of the span)"]
    for c in stall["top"]:
        where = " ".join(str(x) for x in (c.get("tier"), c.get("on")) if x)
        lines.append(f"  {c['unit'] or '?':<30}{where:<18}{_fmt_s(c['seconds']):>12}  x{c['count']}")
    if summary.get("plan"):
        lines += [""] + _format_plan(summary["plan"])
    if summary.get("steps"):
        lines += ["", f"{'step':<8}{'span':>12}{'stalled':>12}  bottleneck"]
        rows = list(summary["steps"].items())
        if len(rows) > STEP_ROWS:
            half = STEP_ROWS // 2
            rows = rows[:half] + [None] + rows[-half:]
        for row in rows:
            if row is None:
                lines.append(f"{'...':<8}")
                continue
            st, v = row
            lines.append(f"{str(st):<8}{_fmt_s(v['span_s']):>12}{_fmt_s(v['stall']['total_s']):>12}  "
                         f"{v['bottleneck'] or 'none'}")
    return "\n".join(lines)


def _format_plan(p):
    per = f"median of {p['steps']} steps" if p["steps"] else "whole trace"
    lines = [f"{'plan vs measured':<16}{'predicted':>12}{'measured':>12}   (per step; measured: {per})"]
    for res, v in p["resources"].items():
        lines.append(f"{res:<16}{_fmt_s(v['predicted_s']):>12}{_fmt_s(v['measured_s']):>12}")
    if p["predicted_step_s"] is not None:
        what = "step" if p["compute_included"] else "state traffic"
        lines.append(f"{what:<16}{_fmt_s(p['predicted_step_s']):>12}{_fmt_s(p['measured_step_s']):>12}")
    lines.append(f"bottleneck: planned {p['bottleneck_predicted'] or 'none'}, measured "
                 f"{p['bottleneck_measured'] or 'none'}")
    if not p["compute_included"]:
        lines.append("(the plan priced state traffic only: it was made without the batch shape, so compute is "
                     "not predicted)")
    return lines


def _fmt_s(sec):
    if sec >= 1:
        return f"{sec:.3f} s"
    if sec >= 1e-3:
        return f"{sec * 1e3:.3f} ms"
    return f"{sec * 1e6:.1f} us"


def _fmt_gb(nbytes):
    return f"{nbytes / 1e9:.3f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.2f} MB"


# -- pictures (offload/timeline_render.py: matplotlib is heavy and only the pictures need it) -------------

def draw_png(events, path, step=None):
    """Draws the lanes over time to a PNG (matplotlib Agg): one bar row per resource, wait spans as red
    stall bands over all rows, the bottleneck in the title. step: only that args.step's spans."""
    from .timeline_render import draw_png as draw
    return draw(events, path, step)


def write_html(events, path, meta=None):
    """Writes a self-contained HTML page (inline canvas and script, no network) with the lanes, the
    summary (with the plan beside the measurement when meta has it), and a step selector when events carry
    args.step."""
    from .timeline_render import write_html as write
    return write(events, path, meta)
