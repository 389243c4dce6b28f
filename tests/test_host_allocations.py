"""The engine's steady step asks torch for no host memory beyond what the model's own forward and backward
ask for under plain PyTorch (bench/host_overhead.py's count: every allocation event torch.profiler saw,
matched op by op against the same model trained by plain PyTorch). CPU device, both state tiers; the
benchmark makes the same count on a GPU."""
import pytest
import torch

import offload
from host_overhead import allocation_counts, build

UNITS, WIDTH = 8, 16


def _extra(tier, clip=None):
    model = build(UNITS, WIDTH)
    n = sum(q.numel() for q in model.parameters())
    gpu = 64 * n if tier == "device" else 4 * n + (1 << 20)
    eng = offload.engine(model, optimizer=offload.AdamW(lr=1e-3, weight_decay=0.01), device="cpu",
                         dtype=torch.float32, gpu_memory=gpu, cpu_memory=None, clip_grad_norm=clip)
    x = torch.randn(4, WIDTH)

    def step():
        eng.backward(eng(x).pow(2).mean())
        eng.step()
        eng.sync()
    ref = build(UNITS, WIDTH)

    def plain_step():
        ref(x).pow(2).mean().backward()
        for q in ref.parameters():
            q.grad = None
    try:
        for _ in range(3):
            step()
            plain_step()
        got, plain = allocation_counts(step, 3), allocation_counts(plain_step, 3)
    finally:
        eng.close()
    return {k: v - plain.get(k, 0) for k, v in got.items() if v > plain.get(k, 0)}


@pytest.mark.parametrize("tier", ["cpu", "device"])
@pytest.mark.parametrize("clip", [None, 1.0], ids=["eager", "clipped"])
def test_a_steady_step_allocates_nothing_beyond_plain_pytorch(tier, clip):
    assert _extra(tier, clip) == {}
