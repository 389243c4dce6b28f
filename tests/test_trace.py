"""trace= on a real run (CPU, model state and params on NVMe): every span kind the CPU path has, with units,
bytes, tiers and steps; the bytes on each link equal what the engine moved; the summary agrees with the
spans; torch.profiler sees offload:: ranges. And the device timer's bookkeeping (event pairs, pool, clock
anchoring) against stand-in events, since the GPU itself is only in test_trace_gpu.py."""
import json

import numpy as np
import pytest

from conftest import make_engine
from models import make_gpt, token_batches
from offload import device_timer, timeline
from offload.cli import main
from offload.profiler import KINDS, Profiler
from test_timeline import check_trace_schema, xs, png_pixels

GRAD_ACCUM = 2
WINDOWS = 3
CPU_KINDS = set(KINDS.values()) - {"other"}


def loop(engine, batches):
    for b in batches:
        engine.backward(engine(**b).loss)
        engine.step()


@pytest.fixture(scope="module")
def nvme_run(tmp_path_factory):
    """One traced run: (trace path, bytes the engine moved while training, the engine's plan)."""
    tmp = tmp_path_factory.mktemp("trace")
    path = tmp / "run.trace.json"
    with make_engine(make_gpt(), mix="nvme", tmp_path=tmp, trace=str(path), grad_accum=GRAD_ACCUM,
                     activations="swap") as engine:
        assert {(u.params_home, u.states_home) for u in engine.plan.units} == {("nvme", "nvme")}
        before = dict(engine.tiers.moved)
        loop(engine, token_batches(GRAD_ACCUM * WINDOWS))
        engine.sync()
        moved = {k: v - before[k] for k, v in engine.tiers.moved.items()}
        units = [u.name for u in engine.units]
        plan = engine.plan
    return path, moved, units, plan


def test_run_trace_holds_every_cpu_span_kind(nvme_run):
    path, _, units, _ = nvme_run
    doc = json.loads(path.read_text())
    check_trace_schema(doc)
    ev = xs(path)
    assert {e["cat"] for e in ev} == CPU_KINDS
    for kind in ("compute", "h2d", "d2h", "optim"):
        assert {e["args"]["unit"] for e in ev if e["cat"] == kind} == set(units), kind
    # Forward and backward compute of every unit in every micro-batch of every step, each with its phase (a
    # unit of several modules, like the embeddings with the head, has a span per module call).
    assert {e["args"].get("phase") for e in ev if e["cat"] == "compute"} == {"forward", "backward"}
    for step in range(WINDOWS):
        for u in units:
            phases = [e["args"]["phase"] for e in ev
                      if e["cat"] == "compute" and e["args"]["unit"] == u and e["args"].get("step") == step]
            assert phases.count("forward") == phases.count("backward") >= GRAD_ACCUM, (u, step, phases)
    tiers = {(e["cat"], e["args"]["tier"]) for e in ev}
    assert {("h2d", "nvme"), ("d2h", "cpu"), ("disk_read", "nvme"), ("optim", "nvme"), ("compute", "cpu"),
            ("act_swap_out", "cpu"), ("act_swap_in", "cpu")} <= tiers
    for kind in ("disk_read", "disk_write", "act_swap_out", "act_swap_in"):
        assert {e["args"]["unit"] for e in ev if e["cat"] == kind} <= set(units), kind
    assert {e["args"]["on"] for e in ev if e["cat"] == "wait"} >= {"disk_read"}
    assert all(e["args"]["clock"] == "host" for e in ev)
    steps = {e["args"].get("step") for e in ev}
    assert set(range(WINDOWS)) <= steps <= set(range(WINDOWS)) | {None}   # None: setup's writes
    meta = timeline.load_meta(path)
    assert meta["units"][units[1]] == {"params": "nvme", "states": "nvme"} and meta["dropped"] == 0


def test_link_bytes_equal_what_the_engine_moved(nvme_run):
    path, moved, _, _ = nvme_run
    ev = [e for e in xs(path) if e["args"].get("step") is not None]   # setup's writes come before step 0
    s = timeline.summarize(timeline.load_trace(path))
    for link in ("h2d", "d2h", "disk_read", "disk_write"):
        assert sum(e["args"]["bytes"] for e in ev if e["cat"] == link) == moved[link] > 0, link
        assert s["links"][link]["bytes"] >= moved[link]


def test_summary_of_a_run_agrees_with_its_spans(nvme_run):
    path, _, _, plan = nvme_run
    ev = xs(path)
    meta = timeline.load_meta(path)
    s = timeline.summarize(timeline.load_trace(path), meta)
    sp = timeline.spans(ev)
    assert s["span_s"] == pytest.approx(max(x.end for x in sp) - min(x.start for x in sp))
    for kind, lane in s["lanes"].items():
        mine = [(x.start, x.end) for x in sp if x.kind == kind]
        assert lane["spans"] == len(mine)
        assert lane["busy_s"] == pytest.approx(timeline.union_length(mine))
        assert lane["busy_s"] <= sum(b - a for a, b in mine) + 1e-12
    waits = [x for x in sp if x.kind == "wait"]
    assert s["stall"]["total_s"] == pytest.approx(sum(x.dur for x in waits))
    top = s["stall"]["top"][0]
    assert top["seconds"] == pytest.approx(sum(x.dur for x in waits if (x.unit, x.tier, x.on) ==
                                               (top["unit"], top["tier"], top["on"])))
    # The plan beside the measurement: the prediction as the engine made it; per step, the median of the
    # steps' busy time per resource.
    p = s["plan"]
    assert p["predicted_step_s"] == pytest.approx(plan.predicted_step_s) and p["steps"] == WINDOWS
    assert {r: v["predicted_s"] for r, v in p["resources"].items()} == pytest.approx(plan.resource_s)
    per_step = [timeline.resource_busy(one) for one in timeline.group_by_step(sp).values()]
    disk = sorted(b["disk"] for b in per_step)[WINDOWS // 2]
    assert p["resources"]["disk"]["measured_s"] == pytest.approx(disk) and disk > 0
    text = timeline.format_summary(s)
    assert "plan vs measured" in text and f"bottleneck: planned {plan.bottleneck}" in text


def test_run_trace_draws_per_step_and_truncated(nvme_run, tmp_path, capsys):
    path, _, _, _ = nvme_run
    png, page = tmp_path / "t.png", tmp_path / "t.html"
    assert main(["timeline", str(path), "-o", str(png), "--html", str(page), "--step", "1"]) == 0
    assert "plan vs measured" in capsys.readouterr().out
    img, colours = png_pixels(png)
    assert len(colours) >= 8 and (img.min(axis=2) < 0.9).mean() > 0.05
    data = page.read_text()
    assert '"steps":["0","1","2"]' in data and "plan vs measured" in data
    text = path.read_text()
    cut = tmp_path / "cut.json"
    cut.write_text(text[:len(text) * 2 // 3])
    assert timeline.load_meta(cut)["plan"]["bottleneck"]   # metadata is written before the events
    assert main(["timeline", str(cut), "-o", str(tmp_path / "cut.png")]) == 0


def test_torch_profiler_sees_offload_ranges(tmp_path):
    """Every span kind is a torch.profiler range: those of the training thread under a default profiler,
    the optimizer worker's too when the profiler records every thread."""
    from torch.profiler import ProfilerActivity, profile
    from torch._C._profiler import _ExperimentalConfig

    ranges = {}
    with make_engine(make_gpt(), mix="nvme", tmp_path=tmp_path, trace=str(tmp_path / "t.json"),
                     activations="swap") as engine:
        loop(engine, token_batches(1))   # the first step records the order that prefetching follows
        prof = engine.profiler
        assert type(prof.begin(0)) is int   # no torch profiler running: no range is opened
        for all_threads in (False, True):
            with profile(activities=[ProfilerActivity.CPU],
                         experimental_config=_ExperimentalConfig(profile_all_threads=all_threads)) as tp:
                loop(engine, token_batches(2))
                engine.sync()
            out = tmp_path / f"torch-{all_threads}.json"
            tp.export_chrome_trace(str(out))
            ranges[all_threads] = {e["name"] for e in json.loads(out.read_text())["traceEvents"]
                                   if str(e.get("name", "")).startswith("offload::")}
    main_thread = {"offload::" + k for k in ("compute", "h2d", "d2h", "disk_read", "act_swap_out", "act_swap_in")}
    assert main_thread <= ranges[False], sorted(ranges[False])
    assert main_thread | {"offload::optim", "offload::disk_write"} <= ranges[True], sorted(ranges[True])


KILLED_RUN = """
import os, pathlib, signal, sys
sys.path.insert(0, {tests!r})
from conftest import make_engine
from models import make_gpt, token_batches
engine = make_engine(make_gpt(), mix="nvme", tmp_path=pathlib.Path({tmp!r}), trace={trace!r}, activations="swap")
for i, batch in enumerate(token_batches(4)):
    loss = engine(**batch).loss
    if i == 3:
        os.kill(os.getpid(), signal.SIGKILL)   # mid-step, between the forward and the backward
    engine.backward(loss)
    engine.step()
"""


def test_a_killed_run_leaves_a_trace_that_renders(tmp_path):
    """A run killed mid-step never reaches close(); the spans of every step it began are in the file
    (appended at each step boundary), and the timeline draws them."""
    import os
    import subprocess
    import sys

    trace = tmp_path / "killed.trace.json"
    code = KILLED_RUN.format(tests=os.path.dirname(__file__), tmp=str(tmp_path), trace=str(trace))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == -9, r.stderr[-2000:]
    with pytest.raises(json.JSONDecodeError):
        json.loads(trace.read_text())    # cut: the event array was never closed
    events = timeline.load_trace(trace)
    for e in events:
        assert e["ph"] in ("X", "M") and isinstance(e["args"], dict)
    steps = {e["args"].get("step") for e in events if e["ph"] == "X"}
    assert {0, 1, 2} <= steps
    assert {e["cat"] for e in events if e["ph"] == "X"} >= {"compute", "h2d", "disk_read", "optim", "act_swap_out"}
    assert timeline.load_meta(trace)["units"]
    png = tmp_path / "killed.png"
    assert main(["timeline", str(trace), "-o", str(png)]) == 0
    img, colours = png_pixels(png)
    assert len(colours) >= 6 and (img.min(axis=2) < 0.9).mean() > 0.03


# -- the device timer, against stand-in events ---------------------------------------------------------------

class FakeDevice:
    """A device clock the test advances, and events that complete when the test says. elapsed_time rounds
    to float32 milliseconds, as cudaEventElapsedTime does."""

    def __init__(self):
        self.ns = 5_000_000_000_000   # device time has its own origin
        self.done_until = self.ns

    def event(self):
        return FakeEvent(self)

    def synchronize(self):
        self.done_until = float("inf")


class FakeEvent:
    def __init__(self, dev):
        self.dev, self.t, self.stream = dev, None, None

    def record(self, stream=None):
        self.t, self.stream = self.dev.ns, stream

    def query(self):
        return self.t is not None and self.t <= self.dev.done_until

    def elapsed_time(self, end):
        assert self.query() and end.query(), "elapsed_time of an event that has not completed"
        return float(np.float32((end.t - self.t) / 1e6))


def make_timer():
    dev, got = FakeDevice(), []
    timer = device_timer.DeviceTimer(lambda *span: got.append(span), dev.event, dev.synchronize,
                                     lambda: "compute")
    dev.done_until = dev.ns
    return dev, got, timer, timer.anchor.ns - dev.ns   # host = device + offset


def test_device_timer_places_spans_on_the_host_clock():
    dev, got, timer, offset = make_timer()
    a = timer.begin()
    dev.ns += 1_000_000
    timer.end(a, 0, 7, 0)
    b = timer.begin("h2d")
    dev.ns += 250_000
    timer.end(b, 1, 8, 4096, "h2d")
    assert (a[0].stream, b[0].stream) == ("compute", "h2d")   # None: the run's device's current stream
    dev.done_until = dev.ns - 1   # the second span has not completed yet
    timer.resolve()
    assert len(got) == 1 and got[0][:3] == (0, 7, 0)
    assert got[0][4] - got[0][3] == pytest.approx(1_000_000, abs=1000)
    assert got[0][3] - offset == pytest.approx(dev.ns - 1_250_000, abs=1000)
    dev.done_until = dev.ns
    timer.resolve()
    assert [g[:3] for g in got] == [(0, 7, 0), (1, 8, 4096)] and got[1][3] >= got[0][4] - 1000


def test_device_timer_reuses_its_events():
    dev, got, timer, _ = make_timer()
    counts = []
    for step in range(6):
        for u in range(10):
            t = timer.begin()
            dev.ns += 1000
            timer.end(t, 0, u, 0)
        dev.done_until = dev.ns
        timer.resolve()
        counts.append(timer.created)
    assert len(got) == 60 and counts[1:] == [counts[0]] * 5


def test_device_timer_chains_its_anchor(monkeypatch):
    """2000 s of device time: one anchor alone would place the last spans ~30 us off (float32 ms); chained
    forward at every resolve, they stay within a few microseconds of the truth."""
    monkeypatch.setattr(device_timer, "REANCHOR_NS", -10**18)   # always due: the host clock barely moves here
    dev, got, timer, offset = make_timer()
    truth = []
    for step in range(400):
        t = timer.begin()
        truth.append(dev.ns + offset)
        dev.ns += 5_000_000_000
        timer.end(t, 0, step, 0)
        dev.done_until = dev.ns
        timer.resolve()
    assert len(got) == 400
    err = max(abs(g[3] - t) for g, t in zip(got, truth))
    assert err < 5_000, f"{err} ns"
    assert dev.ns - (timer.anchor.ns - offset) < 20_000_000_000   # the anchor moved with the run


def test_profiler_on_cpu_times_work_on_the_host(tmp_path):
    prof = Profiler(tmp_path / "t.json")
    t = prof.begin_work(0, 3)
    prof.end_work(t, 0, 3, 5)
    prof.mark_step(0)
    with prof.span(1, 3, 64):
        pass
    prof.close()
    ev = [e for e in json.loads((tmp_path / "t.json").read_text())["traceEvents"] if e["ph"] == "X"]
    assert [(e["cat"], e["args"].get("step"), e["args"]["clock"]) for e in ev] == \
        [("compute", None, "host"), ("h2d", 0, "host")]
