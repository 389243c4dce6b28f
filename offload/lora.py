"""LoRA through peft for `offload train --lora R` (and any caller): the base model is frozen, so the engine
streams its weights read-only (no gradient buffer, no optimizer state, never written back: Note in
groups.py on the trainable prefix), and only the adapters are trained and saved, in peft's own format."""
import torch

from .errors import ConfigError

# Every linear layer of the blocks (attention and MLP projections); peft leaves the output head out.
DEFAULT_TARGETS = "all-linear"


def apply_lora(model, rank, alpha=None, targets=DEFAULT_TARGETS):
    """The peft-wrapped model with rank-`rank` adapters (alpha defaults to 2 * rank, dropout 0). Works on a
    model built on the meta device: the adapters are then created on the CPU with peft's initialisation
    (A random, B zero, so training starts from the base model exactly)."""
    try:
        from peft import LoraConfig, get_peft_model
        from peft.tuners.lora import LoraLayer
    except ImportError:
        raise ConfigError("--lora needs peft: pip install peft") from None
    if not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"--lora {rank}: the adapter rank must be a positive integer")
    config = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=0.0, target_modules=targets,
                        task_type="CAUSAL_LM")
    try:
        wrapped = get_peft_model(model, config)
    except ValueError as e:
        raise ConfigError(f"--lora: {str(e).splitlines()[0]}") from None
    for layer in wrapped.modules():
        if isinstance(layer, LoraLayer):
            for name in layer.active_adapters:
                if any(p.is_meta for p in layer.lora_A[name].parameters()):
                    layer.lora_A[name].to_empty(device="cpu")
                    layer.lora_B[name].to_empty(device="cpu")
                    with torch.no_grad():
                        layer.reset_lora_parameters(name, True)
    return wrapped
