"""The swap timeline (offload/timeline.py): reading traces (whole and truncated), the summary's arithmetic
against the spans themselves, the pictures, and `offload timeline`'s exit codes. Traces here are synthetic
except one written by the real Profiler; traces of real runs are in test_trace.py and test_trace_gpu.py."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from offload import timeline
from offload.cli import main
from offload.errors import ConfigError
from offload.profiler import KINDS, LANES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MB = 1 << 20


def x(kind, unit, ts, dur, nbytes=0, step=None):
    args = {"unit": unit, "bytes": nbytes}
    if step is not None:
        args["step"] = step
    return {"name": f"{kind} {unit}", "cat": kind, "ph": "X", "ts": ts, "dur": dur, "pid": 1,
            "tid": LANES.get(kind, 99), "args": args}


def meta():
    return [{"name": "thread_name", "ph": "M", "pid": 1, "tid": i, "args": {"name": n}} for n, i in LANES.items()]


def pipeline(steps=2, units=4, read_us=800, seed_shift=0):
    """A prefetch pipeline: read a unit from disk, copy it up, compute on it; compute waits when the read
    is late. Every kind appears, so every lane is drawn."""
    ev, t = meta(), seed_shift
    for step in range(steps):
        for u in range(units):
            name = f"layers.{u}"
            ev += [x("disk_read", name, t, read_us, 64 * MB, step), x("h2d", name, t + read_us, 200, 64 * MB, step),
                   x("wait", name, t + 500, read_us + 200 - 500, 0, step),
                   x("compute", name, t + read_us + 200, 300, 0, step),
                   x("act_swap_out", name, t + read_us + 500, 100, 8 * MB, step),
                   x("d2h", name, t + read_us + 500, 150, 16 * MB, step)]
            t += read_us + 500
        ev += [x("act_swap_in", "layers.0", t, 100, 8 * MB, step), x("optim", "all", t + 100, 900, 0, step),
               x("disk_write", "all", t + 100, 700, 256 * MB, step), x("other", "sync", t + 1000, 50, 0, step)]
        t += 1200
    return ev


def write(path, events):
    path.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
    return str(path)


def xs(path):
    """The complete ("X") span events of a trace file."""
    return [e for e in json.loads(path.read_text())["traceEvents"] if e["ph"] == "X"]


def check_trace_schema(doc):
    """The trace-event format's required keys and types, per phase ("X" complete, "M" metadata)."""
    assert isinstance(doc, dict) and isinstance(doc["traceEvents"], list)
    assert isinstance(doc.get("otherData", {}), dict)   # the format's free-form metadata object
    num = (int, float)
    for e in doc["traceEvents"]:
        assert isinstance(e["name"], str) and isinstance(e["ph"], str), e
        assert isinstance(e["pid"], int) and isinstance(e["tid"], int), e
        if e["ph"] == "X":
            assert isinstance(e["ts"], num) and isinstance(e["dur"], num) and e["dur"] >= 0, e
            assert e["cat"] in KINDS.values() and e["name"].split(" ")[0] == e["cat"], e
            assert isinstance(e["args"]["bytes"], int) and "unit" in e["args"], e
        elif e["ph"] == "M":
            assert e["name"] in ("thread_name", "process_name") and isinstance(e["args"]["name"], str), e
        else:
            pytest.fail(f"unexpected phase {e['ph']!r}")


# -- the trace format ------------------------------------------------------------------------------------

def test_profiler_trace_validates_and_summarises(tmp_path):
    from offload.profiler import Profiler
    path = tmp_path / "run.trace.json"
    prof = Profiler(path)
    prof.name_unit(7, "layers.0")
    for kind in (3, 1, 0, 6):  # disk_read, h2d, compute, wait
        with prof.span(kind, 7, 4096 if kind in (1, 3) else 0):
            pass
    prof.close()
    doc = json.loads(path.read_text())
    check_trace_schema(doc)
    s = timeline.summarize(timeline.load_trace(path))
    assert set(s["lanes"]) == {"disk_read", "h2d", "compute", "wait"}
    assert s["links"]["disk_read"]["bytes"] == 4096 and s["links"]["h2d"]["bytes"] == 4096


def test_synthetic_trace_validates():
    check_trace_schema({"traceEvents": pipeline()})


# -- the summary -----------------------------------------------------------------------------------------

def test_summary_totals_agree_with_spans():
    ev = pipeline(steps=2, units=4)
    s = timeline.summarize(ev)
    xs = [e for e in ev if e["ph"] == "X"]
    span = (max(e["ts"] + e["dur"] for e in xs) - min(e["ts"] for e in xs)) / 1e6
    assert s["span_s"] == pytest.approx(span)
    for kind in ("h2d", "d2h", "disk_read", "disk_write"):
        mine = [e for e in xs if e["cat"] == kind]
        assert s["links"][kind]["bytes"] == sum(e["args"]["bytes"] for e in mine)
        busy = s["lanes"][kind]["busy_s"]
        assert s["links"][kind]["gb_per_s"] == pytest.approx(s["links"][kind]["bytes"] / busy / 1e9)
    # No two spans of one lane overlap here, so busy time is the plain sum.
    for kind, lane in s["lanes"].items():
        assert lane["busy_s"] == pytest.approx(sum(e["dur"] for e in xs if e["cat"] == kind) / 1e6)
        assert lane["busy_pct"] == pytest.approx(100 * lane["busy_s"] / span)
    assert s["stall"]["total_s"] == pytest.approx(sum(e["dur"] for e in xs if e["cat"] == "wait") / 1e6)
    assert s["bottleneck"] == "disk_read"
    assert list(s["steps"]) == [0, 1]
    assert sum(v["stall"]["total_s"] for v in s["steps"].values()) == pytest.approx(s["stall"]["total_s"])


def test_overlapping_spans_counted_once():
    # Two reads in flight at once on one link (queue depth 2), one nested inside, one disjoint.
    ev = [x("disk_read", "a", 0, 1000, MB), x("disk_read", "b", 500, 1000, MB),
          x("disk_read", "c", 600, 100, MB), x("disk_read", "d", 3000, 1000, MB)]
    s = timeline.summarize(ev)
    assert s["lanes"]["disk_read"]["busy_s"] == pytest.approx(2500e-6)
    assert s["lanes"]["disk_read"]["busy_pct"] == pytest.approx(62.5)
    assert s["links"]["disk_read"]["bytes"] == 4 * MB  # bytes still all count


intervals = st.lists(st.tuples(st.integers(0, 200), st.integers(0, 50)), min_size=1, max_size=30)


@settings(max_examples=60, deadline=None)
@given(intervals)
def test_busy_time_is_union_length(iv):
    ev = [x("h2d", f"u{i}", a, d) for i, (a, d) in enumerate(iv)]
    covered = set()
    for a, d in iv:
        covered.update(range(a, a + d))  # unit cells covered by at least one span
    s = timeline.summarize(ev)
    assert s["lanes"]["h2d"]["busy_s"] == pytest.approx(len(covered) / 1e6, abs=1e-12)
    assert s["lanes"]["h2d"]["busy_pct"] <= 100.0 + 1e-9


def test_stall_causes_ranked_by_time():
    ev = [x("compute", "c", 0, 100), x("wait", "layers.3", 0, 50), x("wait", "layers.1", 100, 300),
          x("wait", "layers.3", 500, 100)]
    top = timeline.summarize(ev)["stall"]["top"]
    assert [(c["unit"], c["count"]) for c in top] == [("layers.1", 1), ("layers.3", 2)]
    assert top[1]["seconds"] == pytest.approx(150e-6)
    assert timeline.summarize(ev)["bottleneck"] == "compute"  # waiting is never the bottleneck


def test_format_summary_names_every_lane_and_step():
    text = timeline.format_summary(timeline.summarize(pipeline(steps=3)))
    for kind in KINDS.values():
        assert kind in text
    assert "bottleneck: disk_read" in text and re.search(r"^2 ", text, re.M)


# -- reading damaged files -------------------------------------------------------------------------------

def test_truncated_trace_recovers_complete_events(tmp_path):
    ev = pipeline(steps=2)
    full = json.dumps({"traceEvents": ev})
    n_x = sum(e["ph"] == "X" for e in ev)
    cut = full.index(json.dumps(ev[-3])) + 20  # in the middle of the third-to-last event
    path = tmp_path / "cut.json"
    path.write_text(full[:cut])
    got = timeline.load_trace(path)
    assert got == ev[:-3] and sum(e["ph"] == "X" for e in got) == n_x - 3
    timeline.summarize(got)
    timeline.draw_png(got, tmp_path / "cut.png")
    assert main(["timeline", str(path), "-o", str(tmp_path / "cli.png")]) == 0


@pytest.mark.parametrize("text", [
    "[",
    '[{"ph": "X", "ts": 0, "dur": 5, "name": "h2d a", "cat": "h2d"}, {"ph": "X"',
    '{"displayTimeUnit": "ms", "traceEvents": [{"ph": "X", "ts": 1, "dur": 2, "cat": "h2d"},'])
def test_truncated_array_and_object_forms(tmp_path, text):
    path = tmp_path / "t.json"
    path.write_text(text)
    if text == "[":
        with pytest.raises(ConfigError, match="no complete"):
            timeline.load_trace(path)
    else:
        assert len(timeline.load_trace(path)) == 1


@pytest.mark.parametrize("text", ["", "not json", "{}", '{"traceEvents": []}', json.dumps({"traceEvents": meta()})])
def test_bad_traces_raise_config_error(tmp_path, text):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ConfigError):
        timeline.load_trace(path)


# -- pictures --------------------------------------------------------------------------------------------

def png_pixels(path):
    from matplotlib.image import imread
    img = imread(str(path))[..., :3]
    return img, {tuple(p) for p in np.round(img.reshape(-1, 3) * 255).astype(int)[::7]}


def test_png_drawn_and_distinct_per_trace(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    timeline.draw_png(pipeline(steps=2, read_us=800), a)
    timeline.draw_png(pipeline(steps=3, units=2, read_us=2000), b)
    img_a, colours_a = png_pixels(a)
    img_b, _ = png_pixels(b)
    assert img_a.shape[0] > 100 and img_a.shape[1] > 400
    assert len(colours_a) >= 10                     # lanes in their own colours, plus the red stalls
    assert (img_a.min(axis=2) < 0.9).mean() > 0.10  # not mostly blank
    stall = (img_a[..., 0] > 0.8) & (img_a[..., 1] < 0.3) & (img_a[..., 2] < 0.3)
    assert stall.mean() > 0.001                      # the wait lane's red is drawn
    assert img_a.shape != img_b.shape or np.abs(img_a - img_b).mean() > 0.01


def test_png_of_one_step(tmp_path):
    s = timeline.draw_png(pipeline(steps=3), tmp_path / "s.png", step=1)
    assert s["span_s"] == pytest.approx(timeline.summarize(pipeline(steps=3))["steps"][1]["span_s"])
    with pytest.raises(ConfigError, match="steps in the trace: 0, 1, 2"):
        timeline.draw_png(pipeline(steps=3), tmp_path / "s.png", step=9)


def test_html_self_contained_with_step_selector(tmp_path):
    ev = pipeline(steps=2) + [x("compute", "</script><b>", 0, 1, 0, 0)]
    path = tmp_path / "t.html"
    timeline.write_html(ev, path)
    page = path.read_text()
    assert "<canvas" in page and '<select id="step">' in page
    assert not re.search(r"(src|href)=|https?://", page)  # nothing fetched from anywhere
    assert page.count("</script>") == 1                    # a unit name cannot close the script
    data = json.loads(re.search(r"const D = (.*);\n", page).group(1))
    assert data["steps"] == ["0", "1"] and len(data["rows"]) == sum(e["ph"] == "X" for e in ev)


@pytest.mark.skipif(shutil.which("node") is None, reason="node not installed: the page's script is not run")
def test_html_script_runs(tmp_path):
    """Runs the page's script under node with a stub DOM: every view draws without a script error."""
    path = tmp_path / "t.html"
    timeline.write_html(pipeline(steps=2), path)
    script = re.search(r"<script>(.*)</script>", path.read_text(), re.S).group(1)
    stub = """
const ctx = new Proxy({}, {get: (o, k) => k === "measureText" ? () => ({width: 10}) : (k in o ? o[k] : () => {}),
                           set: (o, k, v) => (o[k] = v, true)});
const els = {}, listeners = {};
function el(id) { return els[id] ||= {id, style: {}, options: [], value: "", clientWidth: 800,
  getContext: () => ctx, add(o) { this.options.push(o); }, getBoundingClientRect: () => ({left: 0, top: 0, width: 800}),
  addEventListener: (ev, f) => { listeners[id + ev] = f; }}; }
globalThis.document = {getElementById: el};
globalThis.window = {addEventListener() {}};
globalThis.Option = function (t, v) { this.text = t; this.value = v; };
"""
    check = """
for (const o of el("step").options) { el("step").value = o.value; listeners["stepchange"](); }
listeners["cmousemove"]({clientX: 300, clientY: 20});
console.log(JSON.stringify({n: el("step").options.length, title: el("title").textContent}));
"""
    js = tmp_path / "run.js"
    js.write_text(stub + script + check)
    out = subprocess.run(["node", str(js)], capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["n"] == 3 and got["title"].startswith("bottleneck: disk_read")


# -- the command line ------------------------------------------------------------------------------------

def test_cli_ok(tmp_path, capsys):
    trace = write(tmp_path / "run.trace.json", pipeline())
    png, page = tmp_path / "o.png", tmp_path / "o.html"
    assert main(["timeline", trace, "-o", str(png), "--html", str(page), "--step", "1"]) == 0
    out = capsys.readouterr().out
    assert "bottleneck: disk_read" in out and "stalled" in out
    assert png.stat().st_size > 1000 and page.stat().st_size > 1000


@pytest.mark.parametrize("case", ["missing", "empty", "step"])
def test_cli_bad_input_exits_2(tmp_path, capsys, case):
    trace = {"missing": str(tmp_path / "nope.json"), "empty": write(tmp_path / "e.json", meta()),
             "step": write(tmp_path / "s.json", pipeline())}[case]
    argv = ["timeline", trace, "-o", str(tmp_path / "o.png")] + (["--step", "5"] if case == "step" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("offload: error: ") and err.count("\n") == 1
    assert not (tmp_path / "o.png").exists()


def test_tools_script_exit_codes(tmp_path):
    """The thin script, as a user runs it: one error line, no traceback, exit 2; 0 on a good trace."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    script = os.path.join(ROOT, "tools", "timeline.py")
    bad = subprocess.run([sys.executable, script, str(tmp_path / "nope.json")], capture_output=True, text=True,
                         env=env, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("offload: error:") and "Traceback" not in bad.stderr
    good = subprocess.run([sys.executable, script, write(tmp_path / "t.json", pipeline()), "-o",
                           str(tmp_path / "t.png")], capture_output=True, text=True, env=env, timeout=60)
    assert good.returncode == 0, good.stderr
    assert (tmp_path / "t.png").exists()
