"""The engine's steady step asks torch for no host memory beyond what the model's own forward and backward
ask for under plain PyTorch (bench/host_overhead.py's count: every allocation event torch.profiler saw,
matched op by op against the same model trained by plain PyTorch). CPU device, both state tiers; the
benchmark makes the same count on a GPU."""
import pytest
import torch

import offload
from host_overhead import allocation_counts, build, inline_worker

UNITS, WIDTH = 8, 16


def _extra(tier, clip=None):
    model = build(UNITS, WIDTH)
    gpu = 1 << 30 if tier == "device" else 64 << 10   # everything on the device / states in host memory
    eng = offload.engine(model, optimizer=offload.AdamW(lr=1e-3, weight_decay=0.01), device="cpu",
                         dtype=torch.float32, gpu_memory=gpu, cpu_memory=None, clip_grad_norm=clip)
    homes = {p.states_home for p in eng.plan.units}
    assert homes == ({"gpu"} if tier == "device" else {"cpu"}), str(eng.plan)
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
        with inline_worker(eng):    # the CPU AdamW's thread would not be profiled
            step()                  # this thread's first update makes its scratch
            got = allocation_counts(step, 3)
        plain = allocation_counts(plain_step, 3)
    finally:
        eng.close()
    return {k: v - plain.get(k, 0) for k, v in got.items() if v > plain.get(k, 0)}


@pytest.mark.parametrize("tier", ["cpu", "device"])
@pytest.mark.parametrize("clip", [None, 1.0], ids=["eager", "clipped"])
def test_a_steady_step_allocates_nothing_beyond_plain_pytorch(tier, clip):
    assert _extra(tier, clip) == {}
