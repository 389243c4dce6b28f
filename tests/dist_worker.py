"""One rank of the multi-process tests (tests/test_dist.py starts it under torchrun, or by hand with RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT set). Every rank trains through offload.engine on its own equal slice
of each global batch; rank 0 writes what the test compares with one process on the whole batch.

    python dist_worker.py parity OUT                 cases of CASES; OUT gets {case: Run fields}
    python dist_worker.py save CKPT K OUT            the checkpoint case: K steps, then engine.save(CKPT)
    python dist_worker.py load CKPT[,CKPT] K OUT     engine.load(CKPT), then the steps after the first K
    python dist_worker.py die STEP                   rank 1 exits abruptly inside step STEP; the others go on
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import HP, Run, assert_mix, make_engine  # noqa: E402
from models import make_frozen_gpt, make_gpt, make_mlp, mlp_batches, token_batches  # noqa: E402

from offload.shard import init_from_env  # noqa: E402

STEPS = 4
MLP_BATCH, GPT_BATCH = 12, 6    # global batches: divisible by 2 and 3 ranks


def global_batches(model_name, steps=STEPS):
    if model_name == "mlp":
        return mlp_batches(steps, batch=MLP_BATCH)
    return token_batches(steps, batch=GPT_BATCH)


def make_model(model_name):
    return {"mlp": make_mlp, "gpt": make_gpt, "frozen": make_frozen_gpt}[model_name]()


# name: (model, mix, engine keywords, {rank: micro-batch whose loss that rank alone makes non-finite})
CASES = {
    "mlp-device": ("mlp", "device", {}, {}),
    "mlp-cpu": ("mlp", "cpu", {}, {}),
    "mlp-cpu+nvme": ("mlp", "cpu+nvme", {}, {}),
    "gpt-device": ("gpt", "device", {}, {}),
    "gpt-cpu": ("gpt", "cpu", {}, {}),
    "gpt-cpu+nvme": ("gpt", "cpu+nvme", {}, {}),
    "gpt-clip-accum": ("gpt", "cpu", dict(clip_grad_norm=0.5, grad_accum=2), {}),
    "frozen-cpu+nvme": ("frozen", "cpu+nvme", {}, {}),
    "mlp-poison-one-rank": ("mlp", "cpu", dict(clip_grad_norm=float("inf")), {1: 1}),
    # the list-form collectives a backend without the fused tensor ones gets (shard.Comm)
    "gpt-cpu-list-collectives": ("gpt", "cpu", dict(list_collectives=True), {}),
}


def local_slice(batch, rank, world):
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            n = v.shape[0] // world
            out[k] = v[rank * n:(rank + 1) * n]
        else:
            out[k] = v
    return out


def global_mean(x):
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def train(engine, batches, poison_at=None, stop_in=None):
    """The user's loop on this rank's slices; losses are the global means (what one process would see)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    run = Run(losses=[], stepped=[], state={})
    for i, batch in enumerate(batches):
        loss = engine(**local_slice(batch, rank, world)).loss
        run.losses.append(global_mean(loss.item()))
        if i == poison_at:
            loss = loss * float("inf")
        if i == stop_in:
            os._exit(17)          # a rank dying mid-step: no cleanup, no goodbye to the peers
        engine.backward(loss)
        run.stepped.append(engine.step())
    run.state = engine.state_dict()
    return run


def engine_for(case, tmp):
    model_name, mix, kw, _ = CASES[case]
    kw = dict(kw)
    fused = not kw.pop("list_collectives", False)
    engine = make_engine(make_model(model_name), mix=mix, tmp_path=tmp, shards=dist.get_world_size(), **kw)
    engine.comm.fused_gather = engine.comm.fused_scatter = fused
    assert_mix(engine, mix)
    return engine


def as_dict(run, engine):
    return dict(losses=run.losses, stepped=run.stepped, state=run.state, plan=dict(engine.plan.bytes),
                numel={u.name: (u.numel, u.shard.local) for u in engine.units})


def assert_same_on_every_rank(state):
    """state_dict() gathers the whole model on every rank, not only on rank 0: a digest of its bytes agrees
    across the ranks (rank 0's is compared with one process by the test)."""
    import hashlib
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, h.hexdigest())
    assert len(set(digests)) == 1, f"state_dict() differs between ranks: {digests}"


def cmd_parity(out):
    tmp = os.path.dirname(os.path.abspath(out))
    results = {}
    for case, (model_name, _, _, poison) in CASES.items():
        with engine_for(case, tmp) as engine:
            run = train(engine, global_batches(model_name), poison_at=poison.get(dist.get_rank()))
            assert_same_on_every_rank(run.state)
            results[case] = as_dict(run, engine)
    if dist.get_rank() == 0:
        torch.save(results, out)


CKPT_CASE = "frozen-cpu+nvme"


def cmd_save(ckpt, k, out):
    with engine_for(CKPT_CASE, os.path.dirname(os.path.abspath(out))) as engine:
        run = train(engine, global_batches("frozen")[:k])
        engine.save(ckpt)
        if dist.get_rank() == 0:
            torch.save(as_dict(run, engine), out)


def cmd_load(ckpts, k, out):
    """Each checkpoint in turn into a fresh engine, then the steps after the first k."""
    results = []
    for ckpt in ckpts:
        with engine_for(CKPT_CASE, os.path.dirname(os.path.abspath(out))) as engine:
            engine.load(ckpt)
            run = train(engine, global_batches("frozen")[k:])
            results.append(as_dict(run, engine))
    if dist.get_rank() == 0:
        torch.save(results, out)


def cmd_die(step):
    with engine_for("gpt-cpu", os.environ.get("TMPDIR", "/tmp")) as engine:
        train(engine, global_batches("gpt"), stop_in=step if dist.get_rank() == 1 else None)


def main(argv):
    init_from_env("cpu")
    cmd = argv[0]
    if cmd == "parity":
        cmd_parity(argv[1])
    elif cmd == "save":
        cmd_save(argv[1], int(argv[2]), argv[3])
    elif cmd == "load":
        cmd_load(argv[1].split(","), int(argv[2]), argv[3])
    elif cmd == "die":
        cmd_die(int(argv[1]))
    else:
        raise SystemExit(f"unknown command {cmd!r}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
