"""The sharded engine on a process group of one rank (tests/test_dist_one_rank.py starts it): gloo on the
CPU, NCCL on one GPU. With one rank the engine normally takes no Comm at all; here it is given one, so
every collective of the sharded path (parameter all-gathers, gradient reduce-scatters, norm sums,
checkpoint gathers) runs through the backend, and the run must equal the same training without it.

    python one_rank_worker.py cpu|cuda OUT
"""
import copy
import importlib
import os
import sys
import tempfile

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import make_engine, train_engine  # noqa: E402
from models import make_gpt, token_batches  # noqa: E402

from offload.shard import Comm  # noqa: E402

engine_mod = importlib.import_module("offload.engine")   # the module: offload.engine is also the function


def main(device, out):
    cuda = device == "cuda"
    if cuda:
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    model, batches = make_gpt(), token_batches(4)
    dtype = torch.bfloat16 if cuda else torch.float32
    unsharded = engine_mod.current_comm
    runs = {}
    try:
        for name, comm in (("plain", unsharded), ("one-rank", lambda d: Comm(d))):
            engine_mod.current_comm = comm
            with tempfile.TemporaryDirectory() as tmp, \
                    make_engine(copy.deepcopy(model), mix="cpu+nvme", tmp_path=tmp, device=device,
                                dtype=dtype, clip_grad_norm=1.0) as eng:
                assert (eng.comm is not None) == (name == "one-rank"), name
                got = train_engine(eng, batches, device=device)
            runs[name] = {"losses": got.losses, "stepped": got.stepped, "state": got.state,
                          "backend": str(dist.get_backend())}
    finally:
        engine_mod.current_comm = unsharded
        dist.destroy_process_group()
    torch.save(runs, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
