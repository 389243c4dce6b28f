"""`offload train` end to end on the CPU: checkpoints, exact resume, save_pretrained output, and bad input
answered with one line and exit code 2 (no traceback)."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "offload", "data", "tiny.txt")


def train(*args, cwd):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "offload", "train", "--no-progress", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def common(tmp_path):
    nvme = tmp_path / "nvme"
    nvme.mkdir(exist_ok=True)
    return ["--model", "tiny", "--data", DATA, "--device", "cpu", "--gpu-memory", "5MiB", "--cpu-memory", "24MiB",
            "--nvme", str(nvme), "--seq", "32", "--batch", "2"]


def final_weights(save):
    from safetensors.torch import load_file
    out = {}
    for f in sorted(os.listdir(os.path.join(save, "final"))):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(save, "final", f)))
    return out


def test_train_resume_equals_uninterrupted(tmp_path):
    full = train(*common(tmp_path), "--steps", "4", "--save", str(tmp_path / "full"), cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-2000:]
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["model_state_bytes"]["nvme"] > 0
    half = train(*common(tmp_path), "--steps", "2", "--save", str(tmp_path / "split"), cwd=tmp_path)
    assert half.returncode == 0, half.stderr[-2000:]
    rest = train(*common(tmp_path), "--steps", "4", "--save", str(tmp_path / "split"), "--resume", cwd=tmp_path)
    assert rest.returncode == 0, rest.stderr[-2000:]
    assert "resumed from" in rest.stdout
    a, b = final_weights(tmp_path / "full"), final_weights(tmp_path / "split")
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("case", ["missing-data", "folder-without-weights", "unknown-preset", "empty-jsonl"])
def test_bad_input_one_line_exit_2(tmp_path, case):
    args = common(tmp_path) + ["--steps", "1", "--save", str(tmp_path / "out")]
    if case == "missing-data":
        args[args.index(DATA)] = str(tmp_path / "nope.txt")
    elif case == "folder-without-weights":
        folder = tmp_path / "model"
        folder.mkdir()
        (folder / "config.json").write_text('{"model_type": "llama"}')
        args[args.index("tiny")] = str(folder)
    elif case == "unknown-preset":
        args[args.index("tiny")] = "gigantic"
    else:
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"text": 1}\nnot json\n')
        args[args.index(DATA)] = str(bad)
    r = train(*args, cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [l for l in r.stderr.strip().splitlines() if l.startswith("offload:")]
    assert lines and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_bad_jsonl_lines_counted_and_skipped(tmp_path):
    data = tmp_path / "mixed.jsonl"
    good = [json.dumps({"text": line}) for line in open(DATA).read().splitlines()[:300]]
    data.write_text("\n".join(good[:100] + ["not json", '{"no_text": 1}'] + good[100:]) + "\n")
    args = common(tmp_path) + ["--steps", "1", "--save", str(tmp_path / "out")]
    args[args.index(DATA)] = str(data)
    r = train(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "skipped 2 bad lines" in r.stderr and "101" in r.stderr and "102" in r.stderr
