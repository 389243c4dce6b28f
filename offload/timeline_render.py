"""Pictures of a swap timeline: a PNG (matplotlib, Agg) and a self-contained HTML page. The numbers come
from offload.timeline; this module only draws them."""
import html
import json
import os

from .errors import ConfigError
from .timeline import format_summary, group_by_step, lane_order, merge, select_step, spans, steps_of, summarize

# One fixed colour per kind so two pictures of different runs read alike; wait is the stall colour.
COLOURS = {"compute": "#2ca02c", "h2d": "#1f77b4", "d2h": "#ff7f0e", "disk_read": "#9467bd",
           "disk_write": "#8c564b", "optim": "#e377c2", "wait": "#d62728", "act_swap_out": "#bcbd22",
           "act_swap_in": "#17becf", "other": "#7f7f7f"}
FALLBACK = "#555555"
STALL = "#d62728"


def _spans(events, step):
    sp = spans(events)
    if not sp:
        raise ConfigError("the trace holds no complete ('X') events to draw")
    return select_step(sp, step) if step is not None else sp


def _title(summary, step):
    where = f"step {step}" if step is not None else "whole trace"
    b = summary["bottleneck"]
    busy = f"{b} {summary['lanes'][b]['busy_pct']:.0f}% busy" if b else "no resource lane"
    return f"bottleneck: {busy}; stalled {summary['stall']['pct']:.0f}% ({where})"


def draw_png(events, path, step=None):
    """See offload.timeline.draw_png. Each lane is drawn as the union of its spans: identical to drawing
    every span, and bounded by gaps rather than event count for long traces."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sp = _spans(events, step)
    summary = summarize(sp)
    t0 = summary["start_s"]
    kinds = lane_order(s.kind for s in sp)
    # Milliseconds read well for the step-scale traces this is for; seconds beyond a minute.
    scale, unit = (1.0, "s") if summary["span_s"] > 60 else (1e3, "ms")
    fig = Figure(figsize=(12, 1.0 + 0.45 * len(kinds)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for row, kind in enumerate(kinds):
        bars = [((a - t0) * scale, (b - a) * scale)
                for a, b in merge((s.start, s.end) for s in sp if s.kind == kind)]
        ax.broken_barh(bars, (row - 0.4, 0.8), facecolors=COLOURS.get(kind, FALLBACK))
    # Stalls on top of every lane: what else was (not) running while compute waited is the point.
    stalls = [((a - t0) * scale, (b - a) * scale)
              for a, b in merge((s.start, s.end) for s in sp if s.kind == "wait")]
    if stalls:
        ax.broken_barh(stalls, (-0.5, len(kinds)), facecolors=STALL, alpha=0.25, zorder=3)
    ax.set_yticks(range(len(kinds)), kinds)
    ax.set_ylim(len(kinds) - 0.5, -0.5)
    ax.set_xlim(0, max(summary["span_s"] * scale, 1e-9))
    ax.set_xlabel(f"time ({unit}) from the first traced event")
    ax.set_title(_title(summary, step))
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.fspath(path), format="png")
    return summary


def _payload(sp, meta=None):
    """The page's data: spans as compact rows [lane, start_us, end_us, unit index, bytes, step], plus the
    text summary per view, so the page needs no arithmetic of its own beyond drawing."""
    kinds = lane_order(s.kind for s in sp)
    units = sorted({s.unit for s in sp})
    lane_ix, unit_ix = {k: i for i, k in enumerate(kinds)}, {u: i for i, u in enumerate(units)}
    t0 = min(s.start for s in sp)
    rows = [[lane_ix[s.kind], round((s.start - t0) * 1e6, 3), round((s.end - t0) * 1e6, 3), unit_ix[s.unit],
             s.bytes, None if s.step is None else str(s.step)] for s in sp]
    summary = summarize(sp, meta)
    views = {"": format_summary(summary)}
    titles = {"": _title(summary, None)}
    for st, one in group_by_step(sp).items():
        views[str(st)] = format_summary(summarize(one))
        titles[str(st)] = _title(summary["steps"][st], st)
    return {"lanes": kinds, "colours": [COLOURS.get(k, FALLBACK) for k in kinds], "units": units,
            "rows": rows, "steps": [str(s) for s in steps_of(sp)], "text": views, "titles": titles}


def write_html(events, path, meta=None):
    """See offload.timeline.write_html."""
    sp = _spans(events, None)
    data = json.dumps(_payload(sp, meta), separators=(",", ":"))
    # "</" inside a <script> would end it early (a unit named "</script>"); JSON allows "<\/".
    data = data.replace("</", "<\\/")
    page = _PAGE.replace("@DATA@", data).replace("@TITLE@", html.escape(os.path.basename(os.fspath(path))))
    with open(os.fspath(path), "w", encoding="utf-8") as f:
        f.write(page)


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>offload timeline: @TITLE@</title>
<style>
body{font:13px system-ui,sans-serif;margin:16px;color:#222}
#c{border:1px solid #ccc;width:100%}
pre{background:#f6f6f6;padding:8px;overflow:auto}
#tip{position:fixed;background:#fff;border:1px solid #999;padding:3px 6px;display:none;pointer-events:none}
</style></head><body>
<h3 id="title"></h3>
<label id="stepbox">step <select id="step"></select></label>
<canvas id="c" height="300"></canvas><div id="tip"></div>
<pre id="summary"></pre>
<script>
const D = @DATA@;
const LANE_H = 26, LEFT = 110, TOP = 10, BOTTOM = 24;
const cv = document.getElementById("c"), cx = cv.getContext("2d"), sel = document.getElementById("step");
let shown = [], t0 = 0, t1 = 1;
if (D.steps.length === 0) document.getElementById("stepbox").style.display = "none";
sel.add(new Option("all", ""));
for (const s of D.steps) sel.add(new Option(s, s));
function xOf(t) { return LEFT + (t - t0) / (t1 - t0) * (cv.width - LEFT - 10); }
function draw() {
  const st = sel.value;
  shown = D.rows.filter(r => st === "" || r[5] === st);
  // A loop, not Math.min(...rows): spreading a long trace overflows the call stack.
  t0 = Infinity; t1 = -Infinity;
  for (const r of shown) { if (r[1] < t0) t0 = r[1]; if (r[2] > t1) t1 = r[2]; }
  if (!(t1 > t0)) t1 = t0 + 1;
  cv.width = cv.clientWidth; cv.height = TOP + BOTTOM + LANE_H * D.lanes.length;
  cx.clearRect(0, 0, cv.width, cv.height); cx.font = "12px sans-serif";
  D.lanes.forEach((name, i) => { cx.fillStyle = "#222"; cx.fillText(name, 4, TOP + LANE_H * i + 17); });
  for (const r of shown) {
    cx.fillStyle = D.colours[r[0]];
    cx.fillRect(xOf(r[1]), TOP + LANE_H * r[0] + 3, Math.max(1, xOf(r[2]) - xOf(r[1])), LANE_H - 6);
  }
  // Stalls over every lane, as in the PNG: what ran (or did not) while compute waited.
  const wait = D.lanes.indexOf("wait");
  cx.fillStyle = "rgba(214,39,40,0.25)";
  for (const r of shown) if (r[0] === wait)
    cx.fillRect(xOf(r[1]), TOP, Math.max(1, xOf(r[2]) - xOf(r[1])), LANE_H * D.lanes.length);
  cx.fillStyle = "#222";
  const span = t1 - t0, ms = span < 60e6;
  cx.fillText("0", LEFT, cv.height - 6);
  const end = ms ? (span / 1e3).toFixed(3) + " ms" : (span / 1e6).toFixed(3) + " s";
  cx.fillText(end, cv.width - 10 - cx.measureText(end).width, cv.height - 6);
  document.getElementById("title").textContent = D.titles[st];
  document.getElementById("summary").textContent = D.text[st];
}
cv.addEventListener("mousemove", e => {
  const tip = document.getElementById("tip"), b = cv.getBoundingClientRect();
  const x = (e.clientX - b.left) * cv.width / b.width, lane = Math.floor((e.clientY - b.top - TOP) / LANE_H);
  const t = t0 + (x - LEFT) / (cv.width - LEFT - 10) * (t1 - t0);
  const hit = shown.find(r => r[0] === lane && r[1] <= t && t <= r[2]);
  if (!hit) { tip.style.display = "none"; return; }
  tip.textContent = `${D.lanes[hit[0]]} ${D.units[hit[3]]}: ${((hit[2] - hit[1]) / 1e3).toFixed(3)} ms, ` +
    `${hit[4]} bytes` + (hit[5] === null ? "" : `, step ${hit[5]}`);
  tip.style.left = (e.clientX + 12) + "px"; tip.style.top = (e.clientY + 12) + "px"; tip.style.display = "block";
});
sel.addEventListener("change", draw);
window.addEventListener("resize", draw);
draw();
</script></body></html>
"""
