"""Meta-device loading (offload.engine(model, weights=...)): a model built on the meta device is materialised
unit by unit into its tiers from a Hugging Face folder's safetensors shards, read one shard at a time, and
then equals (weights, logits, training) the same folder loaded by transformers' from_pretrained; peak host
memory stays within the budgets plus one shard; a folder that does not fit the model is refused up front."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

transformers = pytest.importorskip("transformers")

import offload
from offload.weights import RandomInit, WeightsError
from conftest import HP, assert_mix, assert_runs_match, run_reference, tier_kwargs, train_engine
from models import hf_batches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def llama_folder(path, *, tie, layers=4, hidden=32, inter=64, vocab=128, shard="20KB", seed=0):
    """A randomly initialised Llama saved with save_pretrained in several shards; returns the folder."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, tie_word_embeddings=tie)
    cfg._attn_implementation = "eager"
    transformers.LlamaForCausalLM(cfg).save_pretrained(path, max_shard_size=shard)
    return str(path)


def meta_model(folder):
    cfg = transformers.AutoConfig.from_pretrained(folder)
    cfg._attn_implementation = "eager"
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(cfg)


def reference_model(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")


@pytest.mark.parametrize("mix", ["device", "cpu+nvme"])
@pytest.mark.parametrize("tie", [True, False])
def test_meta_load_equals_from_pretrained(tmp_path, tie, mix):
    folder = llama_folder(tmp_path / "model", tie=tie)
    assert sum(f.endswith(".safetensors") for f in os.listdir(folder)) > 5   # really several shards
    ref = reference_model(folder)
    model = meta_model(folder)
    assert all(p.is_meta for p in model.parameters())
    batches = hf_batches("llama", 3)
    want = run_reference(ref, batches, hp=HP)
    with offload.engine(model, optimizer=offload.AdamW(**HP), device="cpu", weights=folder,
                        **tier_kwargs(model, mix, tmp_path)) as eng:
        assert_mix(eng, mix)
        assert not any(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())
        loaded = eng.state_dict()
        expect = ref.state_dict()
        assert loaded.keys() == expect.keys()
        for k in expect:
            assert torch.equal(loaded[k], expect[k]), k
        x = batches[0]["input_ids"]
        with torch.no_grad():
            assert torch.equal(eng(input_ids=x).logits, ref(input_ids=x).logits)
        got = train_engine(eng, batches)
    assert_runs_match(got, want, ref)
    if tie:
        assert torch.equal(got.state["lm_head.weight"], got.state["model.embed_tokens.weight"])


# The child builds the model on the meta device, measures its RSS, lets the engine load the folder, and reports
# the peak after setup: VmHWM, the high-water mark of this process image (ru_maxrss would also count the parent
# the child was forked from). A peak from before the baseline would only make the growth look larger.
RSS_CHILD = textwrap.dedent("""
    import json, sys
    import psutil, torch, transformers
    import offload
    from offload.groups import split_units
    from offload.plan import host_memory_bounds, stream_working_set
    folder, nvme = sys.argv[1], sys.argv[2]
    cfg = transformers.AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.requires_grad_(False)            # a LoRA-style run: the frozen base is all that is loaded
    model.model.norm.weight.requires_grad_(True)
    units = split_units(model)
    gpu = stream_working_set(units, 4)
    cpu = host_memory_bounds(units, itemsize=4, gpu_budget=gpu, grad_accum=1)[0]
    largest = max(u.numel for u in units) * 4
    rss0 = psutil.Process().memory_info().rss
    eng = offload.engine(model, optimizer=offload.AdamW(), device="cpu", gpu_memory=gpu, cpu_memory=cpu,
                         nvme=nvme, weights=folder)
    with open("/proc/self/status") as f:
        peak = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
    assert eng.plan.bytes["nvme"] > 0 and eng.plan.bytes["cpu"] == 0, eng.plan.bytes
    from safetensors.torch import load_file
    import os
    state = eng.state_dict()
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            for k, v in load_file(os.path.join(folder, f)).items():
                assert torch.equal(state[k], v), k
    eng.close()
    print("RESULT " + json.dumps(dict(growth=peak - rss0, gpu=gpu, cpu=cpu, largest_unit=largest)))
""")


def test_meta_load_peak_rss_within_budgets_plus_one_shard(tmp_path):
    """A ~100 MB model in 8 MB shards is loaded with budgets of about a quarter of its size: the process's peak
    RSS grows by at most the budgets + one shard + the units being assembled (two of the largest, fp32) +
    8 MiB of fixed overhead (threads, the store), which is well under the model's own size: a load that held
    the whole model at once could not pass."""
    pytest.importorskip("psutil")
    folder = llama_folder(tmp_path / "model", tie=False, layers=32, hidden=256, inter=688, vocab=2048, shard="8MB")
    shards = [os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors")]
    model_bytes = sum(shards)
    assert len(shards) >= 10 and model_bytes > 90e6
    nvme = tmp_path / "nvme"
    nvme.mkdir()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", RSS_CHILD, folder, str(nvme)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(next(l[7:] for l in r.stdout.splitlines() if l.startswith("RESULT ")))
    bound = res["gpu"] + res["cpu"] + max(shards) + 2 * res["largest_unit"] + (8 << 20)
    assert bound < 0.6 * model_bytes, (bound, model_bytes)
    assert res["growth"] <= bound, (res, bound, model_bytes)


def test_random_init_is_seeded_per_name():
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    states = []
    for seed in (0, 0, 1):
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(cfg)
        with offload.engine(model, device="cpu", weights=RandomInit(seed=seed)) as eng:
            states.append(eng.state_dict())
    a, b, c = states
    assert all(torch.equal(a[k], b[k]) for k in a)
    w = a["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(w, c["model.layers.0.self_attn.q_proj.weight"])
    assert abs(float(w.std()) - 0.02) < 0.003 and abs(float(w.mean())) < 0.003
    assert not torch.equal(w, a["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(a["model.norm.weight"], torch.ones(32))
    ref = transformers.LlamaForCausalLM(cfg)
    assert torch.equal(dict(model.named_buffers())["model.rotary_emb.inv_freq"],
                       dict(ref.named_buffers())["model.rotary_emb.inv_freq"])


def test_meta_model_without_weights_is_refused():
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    with pytest.raises(offload.ConfigError, match="meta device.*weights=FOLDER"):
        offload.engine(model, device="cpu")


@pytest.mark.parametrize("case", ["no-shards", "pickled", "other-model", "wrong-shape", "not-safetensors"])
def test_folder_that_does_not_fit_is_refused(tmp_path, case):
    folder = tmp_path / "model"
    model = meta_model(llama_folder(tmp_path / "good", tie=False))
    if case == "other-model":
        torch.manual_seed(0)
        transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128)
                                     ).save_pretrained(folder)
        match = "no tensor for .* parameters"
    elif case == "wrong-shape":
        llama_folder(folder, tie=False, inter=96)
        match = "do not fit the model.*mlp"
    else:
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        if case == "pickled":
            (folder / "pytorch_model.bin").write_bytes(b"\x80\x04")
            match = "pickled weights are not loaded"
        elif case == "not-safetensors":
            (folder / "model.safetensors").write_bytes(b"\xff" * 64)
            match = "not a safetensors file"
        else:
            match = "no \\*.safetensors shards"
    with pytest.raises(WeightsError, match=match):
        offload.engine(model, device="cpu", weights=str(folder))
    assert all(p.is_meta for p in model.parameters())    # refused before anything was materialised
