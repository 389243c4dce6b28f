"""The sharded engine over NCCL on two GPUs of one host (issue [dist-gpu]), against one process on the whole
global batch on one GPU, for each tier mix: same steps taken, losses and weights within bf16 rounding.
Skipped on machines with fewer than two GPUs. tests/dist_gpu_worker.py does the training; its CPU mode (gloo,
fp32) is checked in CI so that the script itself has run."""
import os
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
WORKER = str(TESTS / "dist_gpu_worker.py")


def _torchrun(nproc, device, out):
    import subprocess
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS)]), OMP_NUM_THREADS="1",
               OFFLOAD_DIST_TIMEOUT="120")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), WORKER,
           device, str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.terminate()     # torchrun passes SIGTERM on to its ranks; SIGKILL would orphan them on the GPUs
        stdout, stderr = proc.communicate(timeout=60)
        pytest.fail("torchrun timed out:\n" + stdout[-3000:] + stderr[-6000:])
    assert proc.returncode == 0, stdout[-3000:] + stderr[-6000:]
    return torch.load(out)


def _check(results, loss_tol, state_tol):
    for mix in ("device", "cpu", "cpu+nvme"):
        ranks, one = results[mix]["ranks"], results[mix]["one"]
        assert ranks["stepped"] == one["stepped"], mix
        torch.testing.assert_close(torch.tensor(ranks["losses"]), torch.tensor(one["losses"]), **loss_tol)
        assert ranks["state"].keys() == one["state"].keys()
        for k, v in one["state"].items():
            torch.testing.assert_close(ranks["state"][k], v, **state_tol, msg=lambda m, k=k, mix=mix: f"{mix} {k}: {m}")


def test_two_gloo_ranks_on_the_cpu_equal_one_process(tmp_path):
    """The worker's CPU mode: fp32 over gloo equals one process to the tolerance the CPU parity tests use for a
    data-parallel mean against a big batch."""
    results = _torchrun(2, "cpu", tmp_path / "runs.pt")
    assert results["backend"] == "gloo" and results["world"] == 2
    _check(results, dict(rtol=1e-5, atol=1e-5), dict(rtol=1e-4, atol=1e-4))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_nccl_ranks_equal_one_process(tmp_path):
    results = _torchrun(2, "cuda", tmp_path / "runs.pt")
    assert results["backend"] == "nccl" and results["world"] == 2
    # bf16 compute: the data-parallel mean of two half-batches and one whole batch round differently
    _check(results, dict(rtol=1e-2, atol=1e-2), dict(rtol=1e-2, atol=1e-3))
