"""A model described by its Hugging Face config alone: built on the meta device (no weights, no memory) so the
planner can split it into units and price a step before anything is downloaded or allocated."""
import json
import os
from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class ModelShape:
    """The figures the step-time model needs. compute_params: parameters that take part in matmuls (the input
    embedding is a lookup, so it counts only when tied to the LM head); block_params: those inside the
    repeated blocks, the part a recomputed forward runs again."""
    layers: int
    hidden: int
    heads: int
    vocab: int
    seq: int
    params: int
    compute_params: int
    block_params: int


def _first(cfg, names, default=None):
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def load_config(path):
    """A transformers config from a model folder or a bare config.json. Raises ConfigError naming path."""
    try:
        from transformers import AutoConfig
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise ConfigError("planning from a config needs transformers: pip install transformers") from None
    if not os.path.exists(path):
        raise ConfigError(f"--model {path}: no such file or directory")
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise ConfigError(f"--model {path}: the folder has no config.json")
    try:
        with open(file) as f:
            raw = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"--model {path}: not a JSON config ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise ConfigError(f"--model {path}: not a Hugging Face config (no 'model_type' key)")
    hf_logging.set_verbosity_error()   # config advice (token ids, defaults) is not the planner's output
    try:
        return AutoConfig.for_model(**raw)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--model {path}: {str(e).splitlines()[0]}") from None


def build_meta_model(config):
    """The model on the meta device: a causal LM where the config has one, else the bare AutoModel."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config)
        except ValueError:
            try:
                return AutoModel.from_config(config)
            except ValueError as e:
                raise ConfigError(f"config of model_type {config.model_type!r}: {str(e).splitlines()[0]}") from None


def model_shape(model, units, seq=None):
    """ModelShape of a (meta) model and its units; seq defaults to the config's context length."""
    cfg = model.config
    hidden = _first(cfg, ("hidden_size", "n_embd", "d_model"))
    layers = _first(cfg, ("num_hidden_layers", "n_layer", "num_layers"))
    heads = _first(cfg, ("num_attention_heads", "n_head"))
    vocab = _first(cfg, ("vocab_size",), 0)
    ctx = _first(cfg, ("max_position_embeddings", "n_positions", "n_ctx"), 2048)
    missing = [n for n, v in (("hidden_size", hidden), ("num_hidden_layers", layers),
                              ("num_attention_heads", heads)) if v is None]
    if missing:
        raise ConfigError(f"config of model_type {cfg.model_type!r} lacks {', '.join(missing)}: "
                          f"cannot price attention or activations")
    params = sum(p.numel() for p in model.parameters())
    emb_in = model.get_input_embeddings()
    emb_out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = emb_out is not None and emb_in is not None and emb_out.weight is emb_in.weight
    compute = params - (0 if tied or emb_in is None else emb_in.weight.numel())
    block = sum(sum(s.numel for s in u.slots) for u in units if u.kind == "block")
    return ModelShape(layers=int(layers), hidden=int(hidden), heads=int(heads), vocab=int(vocab),
                      seq=int(seq or ctx), params=params, compute_params=compute, block_params=block)
