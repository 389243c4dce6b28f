"""Several processes (offload/shard.py): torchrun with 2 and 3 CPU ranks (gloo) against one process on the
global batch, fp32, rel 1e-5; checkpoints saved on 2 ranks and loaded on 3 (and on 1); a rank that dies
mid-step; `torchrun -m offload train`.

The reference is one process that sees the whole global batch and forms the data-parallel mean exactly:
per micro-batch the gradient of each rank's slice, their mean over the ranks in fp64 rounded once to fp32
(as the engine's reduction does: Note [wide reduction] in shard.py), then torch.optim.AdamW. A plain
big-batch step differs from that in the last bits (PyTorch's own big batch and its own split into slices do
too), and AdamW turns such bits into visible steps on weights whose gradient cancels to ~0: the losses are
therefore also checked against the plain big-batch run, which they match within 1e-5.
"""
import copy
import functools
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import HP, LOSS_TOL, Run, assert_losses_close, assert_runs_match, run_reference
import dist_worker as worker

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
WORKER = str(TESTS / "dist_worker.py")
LAUNCH_TIMEOUT_S = 300


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(TESTS)]), OMP_NUM_THREADS="1",
               OFFLOAD_DIST_TIMEOUT="60")
    env.update(extra)
    return env


def torchrun(nproc, *args, cwd=None):
    """`python -m torch.distributed.run --standalone` (a free rendezvous port of its own) on `args`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, cwd=cwd)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def run_data_parallel_reference(model, batches, world, *, grad_accum=1, clip=None, skip=(), hp=HP):
    """Plain PyTorch in one process with the data-parallel arithmetic (see the module docstring); ``world``: the
    rank count, or one per micro-batch (a run resumed on another number of ranks). Micro-batches in ``skip``
    are forwarded (their loss recorded) and contribute nothing, as a skipped non-finite step."""
    threads = torch.get_num_threads()
    # One thread, as each rank runs (OMP_NUM_THREADS=1 in _env): a CPU matmul split over two threads differs
    # from one thread's in the last bits (measured on an AVX-512 EPYC), which AdamW turns into a 1e-5 step on
    # a weight whose gradient cancels (see the module docstring).
    torch.set_num_threads(1)
    try:
        return _data_parallel_reference(model, batches, world, grad_accum, clip, skip, hp)
    finally:
        torch.set_num_threads(threads)


def _data_parallel_reference(model, batches, world, grad_accum, clip, skip, hp):
    worlds = list(world) if isinstance(world, (list, tuple)) else [world] * len(batches)
    model = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, foreach=False, **hp)
    run = Run(losses=[], stepped=[], state={})
    acc = None
    for i, batch in enumerate(batches):
        world = worlds[i]
        losses, grads = [], []
        for r in range(world):
            for p in params:
                p.grad = None
            loss = model(**worker.local_slice(batch, r, world)).loss
            losses.append(loss.item())
            if i not in skip:
                (loss / grad_accum).backward()
                grads.append([None if p.grad is None else p.grad.double() for p in params])
        run.losses.append(sum(losses) / world)
        if i in skip:
            run.stepped.append(False)
            continue
        mean = [None if g[0] is None else (sum(g) / world).float() for g in zip(*grads)]
        acc = mean if acc is None else [a if m is None else (m if a is None else a + m) for a, m in zip(acc, mean)]
        closes = (i + 1) % grad_accum == 0
        run.stepped.append(closes)
        if closes:
            for p, g in zip(params, acc):
                p.grad = g
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(params, clip, foreach=False)
            opt.step()
            opt.zero_grad(set_to_none=True)
            acc = None
    run.state = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    return run


def _as_run(d):
    return Run(losses=d["losses"], stepped=d["stepped"], state=d["state"])


@functools.lru_cache(maxsize=None)
def whole_batch_losses(case):
    """Losses of the plain big-batch run (the same for every rank count)."""
    model_name, _, kw, poison = worker.CASES[case]
    kw = {k: v for k, v in kw.items() if k != "list_collectives"}
    return run_reference(worker.make_model(model_name), worker.global_batches(model_name),
                         grad_accum=kw.get("grad_accum", 1), clip=kw.get("clip_grad_norm"),
                         skip=tuple(poison.values())).losses


def check_case(case, got, world):
    model_name, _, kw, poison = worker.CASES[case]
    model = worker.make_model(model_name)
    kw = {k: v for k, v in kw.items() if k != "list_collectives"}
    ref = run_data_parallel_reference(model, worker.global_batches(model_name), world,
                                      grad_accum=kw.get("grad_accum", 1), clip=kw.get("clip_grad_norm"),
                                      skip=tuple(poison.values()))
    assert_runs_match(_as_run(got), ref, model)
    assert_losses_close(got["losses"], whole_batch_losses(case), **LOSS_TOL)


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"{n}ranks")
def parity_results(request, tmp_path_factory):
    """One torchrun launch per rank count runs every case of dist_worker.CASES."""
    out = tmp_path_factory.mktemp(f"parity{request.param}") / "results.pt"
    torchrun(request.param, WORKER, "parity", str(out))
    return request.param, torch.load(out)


@pytest.mark.parametrize("case", list(worker.CASES))
def test_parity_against_one_process(parity_results, case):
    world, results = parity_results
    check_case(case, results[case], world)


def test_each_rank_holds_its_share(parity_results, tmp_path):
    """Off the compute device a rank holds 1/N of what one process holds (the planner's bytes), and every
    unit splits into N equal slices."""
    from conftest import make_engine

    world, results = parity_results
    for case in ("mlp-cpu", "gpt-cpu"):
        model_name, mix, kw, _ = worker.CASES[case]
        with make_engine(worker.make_model(model_name), mix=mix, tmp_path=tmp_path, **kw) as one:
            single = one.plan.bytes["cpu"]
        per_rank = results[case]["plan"]["cpu"]
        # each region is padded to PAD_ELEMS * N: on these tiny units (a few PAD_ELEMS each) that adds up to
        # a fifth to a rank's share; on real blocks it is negligible
        assert single / world <= per_rank <= single / world * 1.25, (case, world, per_rank, single)
        for name, (numel, local) in results[case]["numel"].items():
            assert local * world == numel, (name, numel, local)


# ------------------------------------------------------------------------------------------- checkpoints

def test_checkpoint_saved_on_2_ranks_loads_on_3_and_on_1(tmp_path):
    """Saved on 2 ranks after K steps, resumed on 3 ranks and in one process; a one-process checkpoint resumed
    on 3 ranks. Each resumed run equals an uninterrupted one (with the rank count of each step), tiers
    differing between save and load included (cpu+nvme on both sides, other budgets per rank count)."""
    import json

    from conftest import make_engine, train_engine

    k, batches = 2, worker.global_batches("frozen")
    model = worker.make_model("frozen")
    two = tmp_path / "ckpt2"
    torchrun(2, WORKER, "save", str(two), str(k), str(tmp_path / "saved2.pt"))
    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["world"] == 2
    assert sorted(p.name for p in two.iterdir() if p.name.startswith("rng")) == [
        "rng-rank-00000.safetensors", "rng-rank-00001.safetensors"]
    one = tmp_path / "ckpt1"
    with make_engine(copy.deepcopy(model), mix="cpu+nvme", tmp_path=tmp_path / "single") as engine:
        saved1 = train_engine(engine, [worker.local_slice(b, 0, 1) for b in batches[:k]])
        engine.save(one)
    torchrun(3, WORKER, "load", f"{two},{one}", str(k), str(tmp_path / "loaded3.pt"))
    from_two, from_one = torch.load(tmp_path / "loaded3.pt")

    ref = run_data_parallel_reference(model, batches, [2] * k + [3] * (len(batches) - k))
    assert_runs_match(_as_run(from_two), Run(ref.losses[k:], ref.stepped[k:], ref.state), model)
    ref1 = run_data_parallel_reference(model, batches, [1] * k + [3] * (len(batches) - k))
    assert_losses_close(saved1.losses, ref1.losses[:k])
    assert_runs_match(_as_run(from_one), Run(ref1.losses[k:], ref1.stepped[k:], ref1.state), model)

    with make_engine(copy.deepcopy(model), mix="cpu+nvme", tmp_path=tmp_path / "single") as engine:
        engine.load(two)
        got = train_engine(engine, batches[k:])
    ref = run_data_parallel_reference(model, batches, [2] * k + [1] * (len(batches) - k))
    assert_runs_match(got, Run(ref.losses[k:], ref.stepped[k:], ref.state), model)


# ------------------------------------------------------------------------------------------- a dead peer

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DEATH_BOUND_S = 150   # start-up of three processes on a loaded machine included; a hang would never end


def test_a_rank_dying_mid_step_fails_the_others_with_a_clear_error(tmp_path):
    """Rank 1 of 3 exits abruptly between forward and backward of step 1 (no torchrun agent, which would
    kill the survivors itself). The survivors must not hang: their next collective fails, and they exit
    non-zero naming the collective and the rank count."""
    port, world = _free_port(), 3
    procs, logs = [], []
    for rank in range(world):
        log = open(tmp_path / f"rank{rank}.log", "w+")
        env = _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                   WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), TMPDIR=str(tmp_path))
        procs.append(subprocess.Popen([sys.executable, WORKER, "die", "1"], env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
        logs.append(log)
    t0 = time.monotonic()
    try:
        for p in procs:
            p.wait(timeout=max(1.0, DEATH_BOUND_S - (time.monotonic() - t0)))
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
    out = []
    for log in logs:
        log.seek(0)
        out.append(log.read())
        log.close()
    assert procs[1].returncode == 17, out[1][-3000:]
    for rank in (0, 2):
        assert procs[rank].returncode not in (0, None, -signal.SIGKILL), (rank, procs[rank].returncode, out[rank][-3000:])
        assert "DistError" in out[rank] and "across 3 ranks failed" in out[rank], out[rank][-3000:]
        assert "a peer process exited" in out[rank], out[rank][-3000:]


# ------------------------------------------------------------------------------------------- offload train

def test_offload_train_under_torchrun(tmp_path):
    """`torchrun --nproc-per-node 2 -m offload train`: rank 0 alone prints and writes the model; the checkpoint
    is sharded; each rank trains on its own half of every batch, so the run equals one process whose batch
    is both halves (losses and weights within the rounding of the data-parallel sum)."""
    import json

    from safetensors.torch import load_file

    data = REPO / "offload" / "data" / "tiny.txt"
    common = ["--model", "tiny", "--data", str(data), "--device", "cpu", "--steps", "2", "--seq", "32",
              "--no-progress"]
    two = tmp_path / "two"
    proc = torchrun(2, "-m", "offload", "train", *common, "--batch", "2", "--save", str(two), cwd=tmp_path)
    assert proc.stdout.count("offload plan on cpu") == 1, proc.stdout
    assert "sharded over 2 ranks" in proc.stdout
    assert proc.stdout.count("where bytes and time went") == 1, proc.stdout
    assert json.loads((two / "checkpoint" / "manifest.json").read_text())["world"] == 2
    summary2 = json.loads((two / "summary.json").read_text())
    assert summary2["ranks"] == 2 and summary2["steps"] == 2

    one = tmp_path / "one"
    r = subprocess.run([sys.executable, "-m", "offload", "train", *common, "--batch", "4", "--save", str(one)],
                       env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert r.returncode == 0, r.stderr[-3000:]
    summary1 = json.loads((one / "summary.json").read_text())
    for key in ("first_loss", "last_loss"):
        assert abs(summary2[key] - summary1[key]) <= 1e-4 * abs(summary1[key]), (key, summary2, summary1)
    w2, w1 = load_file(two / "final" / "model.safetensors"), load_file(one / "final" / "model.safetensors")
    assert set(w2) == set(w1)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
