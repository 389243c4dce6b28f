"""GPU trace (skipped without CUDA): compute, copies and activation swaps are timed on the device, every
unit has its forward and backward compute spans in every step, the spans of one stream never overlap (the
device clock was placed on the host clock consistently), a compute span of a streamed unit starts after a
copy of its parameters ended, and the timer's event pool stops growing."""
import json

import pytest
import torch

from conftest import make_engine
from models import make_gpt, token_batches
from offload import timeline
from offload.cli import main
from test_timeline import check_trace_schema, xs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

STEPS = 8
# Events on one stream: the next span starts no earlier than the previous ended, up to the events'
# resolution (~0.5 us) and float32 elapsed_time over seconds from the anchor (~1 us); a wrongly placed span
# is off by milliseconds.
TOL_US = 5.0


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu-trace")
    path = tmp / "run.trace.json"
    created = []
    with make_engine(make_gpt(), mix="cpu+nvme", tmp_path=tmp, device="cuda", dtype=torch.bfloat16,
                     activations="swap", trace=str(path)) as engine:
        streamed = {u.name for u in engine.units if u.plan.params_home != "gpu"}
        units = [u.name for u in engine.units]
        for b in token_batches(STEPS):
            out = engine(**{k: v.cuda() for k, v in b.items()})
            engine.backward(out.loss)
            engine.step()
            created.append(engine.profiler.timer.created)
    return path, units, streamed, created


def test_device_spans_are_well_formed(gpu_run):
    path, units, streamed, _ = gpu_run
    doc = json.loads(path.read_text())
    check_trace_schema(doc)
    assert streamed, "the cpu+nvme mix should stream some units' parameters"
    ev = xs(path)
    gpu = [e for e in ev if e["args"]["clock"] == "gpu"]
    assert {"compute", "h2d", "d2h", "act_swap_out", "act_swap_in"} <= {e["cat"] for e in gpu}
    assert not any(e["cat"] in ("compute", "h2d", "d2h") and e["args"]["clock"] != "gpu" for e in ev)
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in gpu)
    for kind in ("h2d", "d2h", "act_swap_out"):
        assert all(e["args"]["bytes"] > 0 for e in gpu if e["cat"] == kind), kind
    assert {e["args"]["unit"] for e in gpu if e["cat"] == "h2d"} >= streamed
    names = {e["args"]["name"] for e in doc["traceEvents"] if e["ph"] == "M"}
    assert "gpu compute" in names


def test_every_unit_computes_forward_and_backward_each_step(gpu_run):
    path, units, _, _ = gpu_run
    ev = [e for e in xs(path) if e["cat"] == "compute"]
    for step in range(STEPS):
        for u in units:
            n = sum(e["args"]["unit"] == u and e["args"].get("step") == step for e in ev)
            assert n >= 2, (u, step, n)


def test_spans_of_one_stream_do_not_overlap(gpu_run):
    """The block units' compute runs on the one compute stream, parameter copies on the one host->device
    stream, gradient copies on the device->host stream: each lane is a sequence."""
    path, _, _, _ = gpu_run
    ev = xs(path)
    lanes = {"compute": [e for e in ev if e["cat"] == "compute" and e["args"]["unit"].startswith("blocks.")],
             "h2d": [e for e in ev if e["cat"] == "h2d"], "d2h": [e for e in ev if e["cat"] == "d2h"]}
    for kind, spans in lanes.items():
        spans.sort(key=lambda e: e["ts"])
        assert len(spans) > STEPS, kind
        for a, b in zip(spans, spans[1:]):
            assert b["ts"] >= a["ts"] + a["dur"] - TOL_US, (kind, a, b)


def test_compute_of_a_streamed_unit_follows_a_copy_of_it(gpu_run):
    path, _, streamed, _ = gpu_run
    ev = xs(path)
    copies = {}
    for e in ev:
        if e["cat"] == "h2d":
            copies.setdefault(e["args"]["unit"], []).append(e["ts"] + e["dur"])
    for e in ev:
        if e["cat"] == "compute" and e["args"]["unit"] in streamed:
            assert any(end <= e["ts"] + TOL_US for end in copies[e["args"]["unit"]]), e


def test_event_pool_stops_growing(gpu_run):
    _, _, _, created = gpu_run
    # Steady state after a few steps: spans still in flight at a step boundary vary by a few, and an anchor
    # is chained every 10 s (Note [device clock]); a pool that leaked would grow by every span of every step.
    assert created[-1] - created[3] <= max(8, created[3] // 10), created


def test_gpu_trace_summarises_and_draws(gpu_run, tmp_path, capsys):
    path, _, _, _ = gpu_run
    assert main(["timeline", str(path), "-o", str(tmp_path / "t.png"), "--step", "3"]) == 0
    out = capsys.readouterr().out
    assert "plan vs measured" in out
    s = timeline.summarize(timeline.load_trace(path), timeline.load_meta(path))
    assert s["lanes"]["compute"]["busy_s"] > 0 and s["plan"]["steps"] == STEPS
