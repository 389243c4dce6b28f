"""What trace= costs: the reference workload (bench/reference.py's model, batches, GPU cap and timed loop)
run by offload with tracing off and on, in alternating worker processes (on, off; then off, on; ...), so
drift of the machine over the run falls on both alike. Reports the median step time of each, the overhead
(the issue's limit: 2% of step time) and the per-round ratios; recorded with bench/record.py. With --png,
draws the last traced step with `offload timeline` (the README's picture).

  python bench/trace_overhead.py --rounds 2 --steps 6 --warmup 2 [--png timeline.png] [reference.py's flags]

Flags this script does not know (--layers, --gpu-cap, --nvme, --cpu-memory, ...) go to reference.py's worker
unchanged, so the workload is the one `bench/reference.py --systems offload` measures.
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

LIMIT_PCT = 2.0


def run_worker(passthrough, trace, timeout):
    """One reference.py offload worker: its step times (warm-up excluded) and, when it failed, why."""
    from reference import run_worker as run
    cmd = [sys.executable, os.path.join(HERE, "reference.py"), "--worker", "offload"] + passthrough
    if trace:
        cmd += ["--trace", trace]
    print("==", " ".join(cmd), flush=True)
    out, timed_out = run(cmd, dict(os.environ, PYTHONUNBUFFERED="1"), timeout)
    res = next((json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")), None)
    if res is None:   # a killed worker's log ends with every thread's stack (reference.worker)
        print("\n".join(out.splitlines()[-(120 if timed_out else 30):]), flush=True)
        return None, out.strip().splitlines()[-1][:300] if out.strip() else "no output"
    print(f"   steps: {[round(t, 4) for t in res['times']]}", flush=True)
    return res, None


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2, help="pairs of (off, on) workers")
    p.add_argument("--bench", default="trace-overhead-3.37b")
    p.add_argument("--png", default=None, help="draw the last traced step here")
    p.add_argument("--keep-trace", default=None, help="keep the last trace file here")
    p.add_argument("--timeout", type=int, default=900)
    a, passthrough = p.parse_known_args()
    warmup = _flag(passthrough, "--warmup", 2)
    steps = _flag(passthrough, "--steps", 6)
    from record import record, run_id

    times = {"off": [], "on": []}
    ratios = []
    tmp = tempfile.mkdtemp(prefix="offload-trace-")
    trace = os.path.join(tmp, "run.trace.json")
    for r in range(a.rounds):
        order = ("on", "off") if r % 2 == 0 else ("off", "on")
        medians = {}
        for mode in order:
            res, err = run_worker(passthrough, trace if mode == "on" else None, a.timeout)
            if res is None:
                record({"bench": a.bench, "system": "offload", "status": "failed", "error": f"trace {mode}: {err}"})
                return 1
            times[mode] += res["times"]
            medians[mode] = statistics.median(res["times"])
            if mode == "on":   # the picture as soon as a traced run ends, so a cut-off untraced half keeps it
                draw(trace, a, warmup + steps - 1)
        ratios.append(medians["on"] / medians["off"])
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    overhead = 100.0 * (on / off - 1.0)
    row = {"bench": a.bench, "system": "offload", "run": run_id(), "step_s": round(off, 4),
           "step_s_traced": round(on, 4), "overhead_pct": round(overhead, 2), "limit_pct": LIMIT_PCT,
           "within_limit": overhead <= LIMIT_PCT, "rounds": a.rounds,
           "round_ratios": [round(x, 4) for x in ratios],
           "step_times_off": [round(x, 4) for x in times["off"]], "step_times_on": [round(x, 4) for x in times["on"]]}
    record(row)
    print(json.dumps(row), flush=True)
    print(f"trace off {off:.4f} s, on {on:.4f} s: overhead {overhead:+.2f}% (limit {LIMIT_PCT}%)", flush=True)
    return 0


def draw(trace, a, step):
    """Keeps the trace (--keep-trace) and draws its last step (--png) with `offload timeline`."""
    if a.keep_trace:
        shutil.copyfile(trace, a.keep_trace)
        trace = a.keep_trace
    if a.png:
        from offload.cli import main as cli
        cli(["timeline", trace, "-o", a.png, "--step", str(step)])


def _flag(argv, name, default):
    """An integer flag meant for reference.py, read here too (which step is the last)."""
    for i, x in enumerate(argv):
        if x == name and i + 1 < len(argv):
            return int(argv[i + 1])
        if x.startswith(name + "="):
            return int(x.split("=", 1)[1])
    return default


if __name__ == "__main__":
    sys.exit(main())
