"""`offload train` end to end on the CPU: checkpoints, exact resume, save_pretrained output, and bad input
answered with one line and exit code 2 (no traceback)."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "offload", "data", "tiny.txt")


def train(*args, cwd, progress=False):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    quiet = [] if progress else ["--no-progress"]
    return subprocess.run([sys.executable, "-m", "offload", "train", *quiet, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def common(tmp_path):
    nvme = tmp_path / "nvme"
    nvme.mkdir(exist_ok=True)
    return ["--model", "tiny", "--data", DATA, "--device", "cpu", "--gpu-memory", "5MiB", "--cpu-memory", "24MiB",
            "--nvme", str(nvme), "--seq", "32", "--batch", "2"]


def final_weights(save):
    from safetensors.torch import load_file
    out = {}
    for f in sorted(os.listdir(os.path.join(save, "final"))):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(save, "final", f)))
    return out


def test_train_resume_equals_uninterrupted(tmp_path):
    full = train(*common(tmp_path), "--steps", "4", "--save", str(tmp_path / "full"), cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-2000:]
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["model_state_bytes"]["nvme"] > 0
    half = train(*common(tmp_path), "--steps", "2", "--save", str(tmp_path / "split"), cwd=tmp_path)
    assert half.returncode == 0, half.stderr[-2000:]
    rest = train(*common(tmp_path), "--steps", "4", "--save", str(tmp_path / "split"), "--resume", cwd=tmp_path)
    assert rest.returncode == 0, rest.stderr[-2000:]
    assert "resumed from" in rest.stdout
    a, b = final_weights(tmp_path / "full"), final_weights(tmp_path / "split")
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_train_reports_progress_logs_and_checkpoints(tmp_path):
    """The progress bar (loss, tokens/s, ETA, bytes per tier), the log file with every step, and a periodic
    checkpoint."""
    save = tmp_path / "run"
    r = train(*common(tmp_path), "--steps", "3", "--checkpoint-every", "2", "--save", str(save), cwd=tmp_path,
              progress=True)
    assert r.returncode == 0, r.stderr[-2000:]
    bar = [line for line in r.stderr.replace("\r", "\n").splitlines() if "step/s" in line or "s/step" in line][-1]
    assert "3/3" in bar and "<" in bar, bar     # done, with tqdm's elapsed<remaining
    for field in ("loss=", "tok_s=", "gpu=", "cpu=", "nvme="):
        assert field in bar, (field, bar)
    log = (save / "train.log").read_text()
    for step in (1, 2, 3):
        assert f"step {step} loss " in log and "tokens/s" in log
    assert f"checkpoint {save / 'checkpoint'} at step 2" in log
    assert "plan:" in log and f"log: {save / 'train.log'}" in r.stdout


@pytest.mark.parametrize("case", ["missing-data", "folder-without-weights", "unknown-preset", "empty-jsonl"])
def test_bad_input_one_line_exit_2(tmp_path, case):
    args = common(tmp_path) + ["--steps", "1", "--save", str(tmp_path / "out")]
    if case == "missing-data":
        args[args.index(DATA)] = str(tmp_path / "nope.txt")
    elif case == "folder-without-weights":
        folder = tmp_path / "model"
        folder.mkdir()
        (folder / "config.json").write_text('{"model_type": "llama"}')
        args[args.index("tiny")] = str(folder)
    elif case == "unknown-preset":
        args[args.index("tiny")] = "gigantic"
    else:
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"text": 1}\nnot json\n')
        args[args.index(DATA)] = str(bad)
    r = train(*args, cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [l for l in r.stderr.strip().splitlines() if l.startswith("offload:")]
    assert lines and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_bad_jsonl_lines_counted_and_skipped(tmp_path):
    data = tmp_path / "mixed.jsonl"
    good = [json.dumps({"text": line}) for line in open(DATA).read().splitlines()[:300]]
    data.write_text("\n".join(good[:100] + ["not json", '{"no_text": 1}'] + good[100:]) + "\n")
    args = common(tmp_path) + ["--steps", "1", "--save", str(tmp_path / "out")]
    args[args.index(DATA)] = str(data)
    r = train(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "skipped 2 bad lines" in r.stderr and "101" in r.stderr and "102" in r.stderr


# ------------------------------------------------------------------------------ a Hugging Face model folder

def make_folder(path, vocab_model=None, tokenizer=True, tok_vocab=200):
    """A tiny Llama folder as a user would have it: sharded safetensors, config, and a BPE tokenizer trained on
    the demo data (so no download). vocab_model: the model's vocabulary (default: the tokenizer's)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train([DATA], trainers.BpeTrainer(vocab_size=tok_vocab, special_tokens=["[UNK]", "[EOS]"],
                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab_model or len(fast), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=128, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path, max_shard_size="100KB")
    if tokenizer:
        fast.save_pretrained(path)
    return str(path)


def folder_args(tmp_path, folder, *extra):
    args = common(tmp_path) + ["--steps", "2", "--save", str(tmp_path / "out"), *extra]
    args[args.index("tiny")] = folder
    args[args.index("5MiB")] = "2MiB"
    return args


def test_train_folder_full(tmp_path):
    """A folder is built on the meta device and read shard by shard; final/ loads with from_pretrained."""
    import transformers
    folder = make_folder(tmp_path / "model")
    r = train(*folder_args(tmp_path, folder), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["model_state_bytes"]["cpu"] > 0
    base = transformers.AutoModelForCausalLM.from_pretrained(folder).state_dict()
    out = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final").state_dict()
    assert out.keys() == base.keys()
    assert all(out[k].shape == base[k].shape for k in base)
    assert not torch.equal(out["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])


def test_train_folder_lora(tmp_path):
    """--lora 4: the base stays as it was; final/ holds peft adapters that load onto the folder's model."""
    peft = pytest.importorskip("peft")
    import transformers
    folder = make_folder(tmp_path / "model")
    r = train(*folder_args(tmp_path, folder, "--lora", "4"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    final = tmp_path / "out" / "final"
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(os.listdir(final))
    cfg = json.loads((final / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and os.path.samefile(cfg["base_model_name_or_path"], folder)
    model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(folder), final)
    trained = [n for n, p in model.named_parameters() if "lora_B" in n and p.abs().sum() > 0]
    assert trained, "the adapters were not trained"


@pytest.mark.parametrize("case", ["unknown-architecture", "tokenizer-mismatch", "no-tokenizer", "pickled-weights",
                                  "bad-lora-rank"])
def test_bad_folder_one_line_exit_2(tmp_path, case):
    folder = tmp_path / "model"
    extra = []
    if case == "unknown-architecture":
        folder.mkdir()
        (folder / "config.json").write_text('{"model_type": "no-such-architecture"}')
        (folder / "model.safetensors").write_bytes(b"")
        expect = "no-such-architecture"
    elif case == "tokenizer-mismatch":
        make_folder(folder, vocab_model=64)
        expect = "tokenizer and model do not match"
    elif case == "no-tokenizer":
        make_folder(folder, tokenizer=False)
        expect = "no usable tokenizer"
    elif case == "pickled-weights":
        folder.mkdir()
        (folder / "config.json").write_text('{"model_type": "llama"}')
        (folder / "pytorch_model.bin").write_bytes(b"\x80\x04")
        expect = "pickled weights are not loaded"
    else:
        make_folder(folder)
        extra = ["--lora", "0"]
        expect = "rank must be a positive integer"
    r = train(*folder_args(tmp_path, str(folder), *extra), cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [l for l in r.stderr.strip().splitlines() if l.startswith("offload:")]
    assert len(lines) == 1 and expect in lines[0] and "Traceback" not in r.stderr, r.stderr[-2000:]
