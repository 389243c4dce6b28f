"""Model presets for `offload train`: LLaMA-shaped models with random weights, by name.

"tiny" is for demos and CI (under a million parameters, byte-level vocabulary); the others follow the
published LLaMA shapes. Built with transformers' LlamaForCausalLM so the result saves and loads with
save_pretrained / from_pretrained."""
from .errors import ConfigError

PRESETS = {
    #        hidden, intermediate, layers, heads, key/value heads, vocab
    "tiny": (128, 352, 8, 4, 4, 259),
    "1b": (2048, 5504, 24, 16, 16, 32000),
    "3b": (3072, 8192, 28, 24, 24, 32000),
    "7b": (4096, 11008, 32, 32, 32, 32000),
    "13b": (5120, 13824, 40, 40, 40, 32000),
    "70b": (8192, 28672, 80, 64, 8, 32000),   # grouped-query attention, as LLaMA-2-70B: 69.0B parameters
}


def preset_config(name, max_seq=4096):
    try:
        from transformers import LlamaConfig
    except ImportError:
        raise ConfigError("presets need transformers: pip install transformers") from None
    key = name.lower()
    if key not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)} or pass a model folder")
    hidden, inter, layers, heads, kv_heads, vocab = PRESETS[key]
    return LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                       max_position_embeddings=max_seq, tie_word_embeddings=(key == "tiny"),
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)


def build_preset(name, seed=0, max_seq=4096):
    import torch
    from transformers import LlamaForCausalLM
    config = preset_config(name, max_seq)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return model, config


def param_count(config):
    h, i, n, v = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    kv = h * config.num_key_value_heads // config.num_attention_heads
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    head = 0 if config.tie_word_embeddings else v * h
    return n * per_layer + v * h + head + h
