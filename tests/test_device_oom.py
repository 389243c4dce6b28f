"""Out of memory on the compute device while the engine is within gpu_memory: the error says so with the
numbers and names the budget to change (README "Guarantees"). On the CPU the out-of-memory error is
raised from inside a live engine's fetch or update, where a CUDA allocation would fail; on a GPU a real
one is provoked by a batch whose activations do not fit what the process may use.
"""
import copy
import gc

import pytest
import torch

import offload
from conftest import HP, make_engine, tier_kwargs, train_engine
from models import make_gpt, make_mlp, mlp_batches, token_batches
from offload.sizes import fmt_bytes

CUDA_OOM = "CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 79.10 GiB"


def _assert_names_the_budget(err, eng, where):
    assert type(err) is offload.DeviceMemoryError and isinstance(err, torch.OutOfMemoryError)
    assert isinstance(err.__cause__, torch.OutOfMemoryError)
    msg = str(err)
    assert f"in {where}, under gpu_memory={fmt_bytes(eng.plan.budgets['gpu'])}:" in msg, msg
    assert f"keeps {fmt_bytes(eng.plan.bytes['gpu'])} of model state" in msg, msg
    assert f"{fmt_bytes(eng.plan.buffers['gpu_stream'])} of streaming buffers" in msg, msg
    assert "lower gpu_memory" in msg and "activations='recompute'" in msg and "offload plan --batch" in msg, msg
    return msg


@pytest.mark.parametrize("phase", ["forward", "backward"])
def test_gpu_oom_under_cap_names_the_budget(tmp_path, phase):
    """A live engine streaming from the CPU tier; the fetch of the third unit in `phase` raises
    torch.OutOfMemoryError (the CUDA caching allocator's message). The engine re-raises it as
    offload.DeviceMemoryError naming the phase, the unit, gpu_memory with the plan's figures and the fix,
    the original chained; close() still removes its hooks."""
    model, batches = make_mlp(depth=10), mlp_batches(1)
    eng = make_engine(copy.deepcopy(model), mix="cpu", tmp_path=tmp_path)
    streamed = [u for u in eng.units if u.plan.params_home != "gpu"]
    assert len(streamed) >= 3 and eng.plan.budgets["gpu"] is not None
    order = streamed if phase == "forward" else streamed[::-1]
    victim, real_fetch = order[2], eng.tiers.fetch

    def fetch(u):
        if u is victim and eng.streamer.phase == phase:
            raise torch.OutOfMemoryError(CUDA_OOM)
        return real_fetch(u)

    eng.tiers.fetch = fetch
    with pytest.raises(offload.DeviceMemoryError) as ei:
        loss = eng(**batches[0]).loss
        eng.backward(loss)
    msg = _assert_names_the_budget(ei.value, eng, f"{phase} at unit {victim.name}")
    assert msg.endswith(f"({CUDA_OOM})")
    eng.close()
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in eng.module.modules())


def test_gpu_oom_in_step_names_the_budget(tmp_path):
    """The device-tier AdamW (states on the compute device) runs out of memory inside step() (clipping: it
    runs there, once the global norm is known): the same DeviceMemoryError, located in step."""
    model, batches = make_mlp(), mlp_batches(1)
    with make_engine(copy.deepcopy(model), mix="device", tmp_path=tmp_path, clip_grad_norm=1.0) as eng:
        assert any(u.plan.states_home == "gpu" for u in eng.units)

        def update_device(u, hyper, scale):
            raise torch.OutOfMemoryError(CUDA_OOM)

        eng.unit_opt.update_device = update_device
        eng.backward(eng(**batches[0]).loss)
        with pytest.raises(offload.DeviceMemoryError) as ei:
            eng.step()
        _assert_names_the_budget(ei.value, eng, "step")


def test_gpu_oom_in_update_at_landing_names_the_budget(tmp_path):
    """Without clipping the device-tier AdamW runs as each unit's gradients land (Note [device-tier update
    at landing] in engine.py): out of memory there is the same DeviceMemoryError, located in backward."""
    model, batches = make_mlp(), mlp_batches(1)
    with make_engine(copy.deepcopy(model), mix="device", tmp_path=tmp_path) as eng:
        assert any(u.plan.states_home == "gpu" for u in eng.units)

        def update(*args, **kwargs):
            raise torch.OutOfMemoryError(CUDA_OOM)

        eng.device_updater.update = eng.device_updater.update_resident = update
        with pytest.raises(offload.DeviceMemoryError) as ei:
            eng.backward(eng(**batches[0]).loss)
        first = [u for u in eng.units if u.trainable][-1]   # backward's first gradients are the last unit's
        _assert_names_the_budget(ei.value, eng, f"backward at unit {first.name}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_oom_under_cap_real(tmp_path):
    """On a GPU: the process may use only what the engine's planned bytes need plus 64 MiB
    (torch.cuda.set_per_process_memory_fraction, as if other processes held the rest), and a batch's
    activations need far more. The engine stays within gpu_memory while it trains small batches, and the
    big batch fails with DeviceMemoryError naming gpu_memory and the device's figures."""
    model = make_gpt(vocab=512, d=256, n_layer=8, n_head=4, max_len=64)
    small = [{k: v.cuda() for k, v in b.items()} for b in token_batches(2, seq=64, vocab=512)]
    big = {k: v.cuda() for k, v in token_batches(1, batch=1024, seq=64, vocab=512)[0].items()}
    gpu_memory = 16 << 20
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.set_per_process_memory_fraction(min(1.0, (torch.cuda.memory_reserved() + (96 << 20)) / total))
    try:
        with offload.engine(model, optimizer=offload.AdamW(**HP), device="cuda", dtype=torch.bfloat16,
                            gpu_memory=gpu_memory, cpu_memory=1 << 30) as eng:
            assert all(train_engine(eng, small, device="cuda").stepped)
            torch.cuda.synchronize()
            assert torch.cuda.max_memory_allocated() - base <= gpu_memory     # the cap is honoured
            with pytest.raises(offload.DeviceMemoryError) as ei:
                eng.backward(eng(**big).loss)
                eng.step()
            msg = str(ei.value)
            assert f"under gpu_memory={fmt_bytes(gpu_memory)}:" in msg and "lower gpu_memory" in msg, msg
            assert "PyTorch holds" in msg and " free of " in msg, msg
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        gc.collect()
        torch.cuda.empty_cache()
