"""Two or more ranks of the sharded engine on GPUs (tests/test_dist_gpu.py starts it under torchrun; NCCL, one
GPU a rank), against one process training on the whole global batch on rank 0's GPU. Every rank trains its
own slice of each batch through offload.engine, for each tier mix; then the process group is closed and rank
0 trains the same model alone (no group: no peer waits on it) and writes both runs for the test to compare.

    python dist_gpu_worker.py cuda|cpu OUT      (cpu: gloo, fp32: the same code on a machine without GPUs)
"""
import copy
import os
import sys
import tempfile

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import assert_mix, make_engine, train_engine  # noqa: E402
from dist_worker import global_batches, local_slice  # noqa: E402
from models import make_gpt  # noqa: E402

from offload.shard import init_from_env  # noqa: E402

MIXES = ("device", "cpu", "cpu+nvme")


def _to(batch, device):
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def global_mean(x, device):
    """The mean over the ranks of a number, reduced on the ranks' device (an NCCL group has no CPU backend)."""
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def sharded_run(model, batches, mix, device, dtype, tmp):
    rank, world = dist.get_rank(), dist.get_world_size()
    losses, stepped = [], []
    with make_engine(copy.deepcopy(model), mix=mix, tmp_path=tmp, device=device, dtype=dtype, shards=world) as eng:
        assert eng.comm is not None and eng.comm.world == world
        for batch in batches:
            loss = eng(**_to(local_slice(batch, rank, world), device)).loss
            losses.append(global_mean(loss.detach().float().item(), device))
            eng.backward(loss)
            stepped.append(eng.step())
        state = eng.state_dict()
    return {"losses": losses, "stepped": stepped, "state": {k: v.detach().float().cpu() for k, v in state.items()}}


def one_process_run(model, batches, mix, device, dtype, tmp):
    with make_engine(copy.deepcopy(model), mix=mix, tmp_path=tmp, device=device, dtype=dtype) as eng:
        assert eng.comm is None
        if device == "cpu":
            assert_mix(eng, mix)
        got = train_engine(eng, batches, device=device)
    return {"losses": got.losses, "stepped": got.stepped,
            "state": {k: v.detach().float().cpu() for k, v in got.state.items()}}


def main(device, out):
    init_from_env(device)
    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    dev = f"cuda:{torch.cuda.current_device()}" if cuda else "cpu"
    model, batches = make_gpt(), global_batches("gpt")
    rank = dist.get_rank()
    results = {"backend": str(dist.get_backend()), "world": dist.get_world_size()}
    for mix in MIXES:
        with tempfile.TemporaryDirectory() as tmp:
            results[mix] = {"ranks": sharded_run(model, batches, mix, dev, dtype, tmp)}
    dist.destroy_process_group()
    if rank != 0:
        return
    for mix in MIXES:
        with tempfile.TemporaryDirectory() as tmp:
            results[mix]["one"] = one_process_run(model, batches, mix, dev, dtype, tmp)
    torch.save(results, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
