"""LoRA through peft: a peft-wrapped model trains through the engine exactly as plain PyTorch + peft does
(adapters only; the frozen base never changes), the frozen base is streamed read-only (no gradient
buffers, no optimizer state, no write-back to the swap store), and save_pretrained writes the adapters in
peft's format, which PeftModel.from_pretrained loads to the engine's logits."""
import copy
import os

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import offload
from offload.lora import apply_lora
from conftest import HP, assert_mix, assert_runs_match, make_engine, run_engine, run_reference, train_engine
from models import hf_batches, make_hf

LORA_HP = dict(HP, lr=5e-3)
STEPS = 4


def lora_llama(rank=4, seed=0):
    torch.manual_seed(seed + 1)     # peft's random A matrices
    return apply_lora(make_hf("llama", seed), rank)


def test_apply_lora_freezes_the_base():
    model = lora_llama()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    targets = {n.rsplit(".lora_A", 1)[0].rsplit(".", 1)[1] for n in trainable if ".lora_A" in n}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize("mix", ["cpu", "nvme"])
def test_lora_parity_with_plain_peft(mix, tmp_path):
    model = lora_llama()
    batches = hf_batches("llama", STEPS)
    ref = run_reference(model, batches, hp=LORA_HP)
    got = run_engine(model, batches, mix=mix, tmp_path=tmp_path, hp=LORA_HP)
    assert all(got.stepped)
    assert_runs_match(got, ref, model)
    init = model.state_dict()
    moved = [k for k in init if "lora_B" in k and not torch.equal(got.state[k], init[k])]
    assert moved, "the adapters did not train"
    for k, v in init.items():
        if "lora_" not in k:
            assert torch.equal(got.state[k], v), f"frozen base weight {k} changed"


def test_frozen_base_is_streamed_read_only(tmp_path):
    """Params and states on NVMe: per step the disk takes only the adapters' params (the unit's trainable
    prefix) and their master/m/v; gradient buffers and optimizer states cover the adapters alone."""
    model = lora_llama()
    with make_engine(copy.deepcopy(model), mix="nvme", tmp_path=tmp_path, hp=LORA_HP) as eng:
        assert_mix(eng, "nvme")
        frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        for u in eng.units:
            train = sum(s.numel for s in u.slots if s.trainable)
            assert u.numel_train < train + 2048 + 64 * len(u.slots)    # the adapters, aligned and padded
            if u.st.grad is not None:
                assert u.st.grad.numel() == u.numel_train
        assert sum(u.numel - u.numel_train for u in eng.units) >= frozen
        written0 = eng.tiers.moved["disk_write"]
        train_engine(eng, hf_batches("llama", 2))
        eng.sync()
        per_step = sum(u.numel_train * eng.tiers.itemsize for u in eng.units if u.plan.params_home == "nvme") + \
            sum(u.numel_train * 12 for u in eng.units if u.plan.states_home == "nvme")
        assert eng.tiers.moved["disk_write"] - written0 == 2 * per_step


def test_adapters_saved_in_peft_format(tmp_path):
    model = lora_llama()
    batches = hf_batches("llama", 2)
    with make_engine(model, mix="cpu", tmp_path=tmp_path, hp=LORA_HP) as eng:
        train_engine(eng, batches)
        with torch.no_grad():
            logits = eng(input_ids=batches[0]["input_ids"]).logits
        eng.save_pretrained(tmp_path / "adapter")
    files = set(os.listdir(tmp_path / "adapter"))
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files
    assert not any(f.startswith("model") for f in files)        # the base is not duplicated
    back = peft.PeftModel.from_pretrained(make_hf("llama"), tmp_path / "adapter")
    with torch.no_grad():
        again = back(input_ids=batches[0]["input_ids"]).logits
    torch.testing.assert_close(again, logits, rtol=0, atol=0)


def test_lora_on_a_meta_model_loaded_from_a_folder(tmp_path):
    """The CLI's path for a folder: base built on the meta device, adapters added by apply_lora, base weights
    read from the shards by the engine; equals the same adapters on a from_pretrained base."""
    import transformers
    make_hf("llama").save_pretrained(tmp_path / "base", max_shard_size="20KB")
    cfg = transformers.AutoConfig.from_pretrained(tmp_path / "base")
    cfg._attn_implementation = "eager"
    with torch.device("meta"):
        meta = transformers.AutoModelForCausalLM.from_config(cfg)
    torch.manual_seed(1)
    meta = apply_lora(meta, 4)
    ref = lora_llama()
    adapters = {k: v for k, v in meta.state_dict().items() if "lora_" in k}
    assert adapters and not any(v.is_meta for v in adapters.values())
    ref.load_state_dict(adapters, strict=False)     # the same starting adapters (peft draws A at random)
    batches = hf_batches("llama", 3)
    want = run_reference(ref, batches, hp=LORA_HP)
    with offload.engine(meta, optimizer=offload.AdamW(**LORA_HP), device="cpu", weights=str(tmp_path / "base")) as eng:
        got = train_engine(eng, batches)
    assert_runs_match(got, want, ref)
