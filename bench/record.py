"""Appends one benchmark result to bench/results.jsonl and a row to bench/RESULTS.md.

Every bench/ script calls record(); the fields are DESIGN.md's ("bench", "system", "run", "step_s", ...),
plus whatever extra figures the script measured. Missing common fields are filled in here: device, date,
commit and command.
"""
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
# OFFLOAD_BENCH_RESULTS: another directory for both files (tests run the scripts' small modes there)
RESULTS_DIR = os.environ.get("OFFLOAD_BENCH_RESULTS") or HERE
RESULTS_JSONL = os.path.join(RESULTS_DIR, "results.jsonl")
RESULTS_MD = os.path.join(RESULTS_DIR, "RESULTS.md")
_RUN_ID = os.environ.get("OFFLOAD_BENCH_RUN") or uuid.uuid4().hex[:12]


def run_id():
    """The id shared by every row this process records (rows measured side by side)."""
    return _RUN_ID


def commit():
    if os.environ.get("OFFLOAD_COMMIT"):   # a copy of the tree without .git (the GPU machine) is told its commit
        return os.environ["OFFLOAD_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def device():
    try:
        import torch
        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} / {os.cpu_count()} cpu"
    except ImportError:
        pass
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu} / {os.cpu_count()} cpu"


def record(row, command=None):
    row = dict(row)
    row.setdefault("run", _RUN_ID)
    row.setdefault("device", device())
    row.setdefault("date", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"))
    row.setdefault("commit", commit())
    row.setdefault("command", command or " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:]))
    with open(RESULTS_JSONL, "a") as f:
        f.write(json.dumps(row, sort_keys=False) + "\n")
    _append_md(row)
    return row


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _append_md(row):
    new = not os.path.exists(RESULTS_MD)
    with open(RESULTS_MD, "a") as f:
        if new:
            f.write("# Benchmark results\n\nOne row per measurement, newest last; the full record of each row is "
                    "the line with the same run id in results.jsonl.\n\n"
                    "| date | bench | system | run | figures | device | commit | command |\n"
                    "|---|---|---|---|---|---|---|---|\n")
        skip = {"date", "bench", "system", "run", "device", "commit", "command"}
        figures = ", ".join(f"{k}={_fmt(v)}" for k, v in row.items() if k not in skip and v is not None)
        f.write(f"| {row['date']} | {row.get('bench', '')} | {row.get('system', '')} | {row['run']} | {figures} | "
                f"{row['device']} | {row['commit']} | `{row['command']}` |\n")
