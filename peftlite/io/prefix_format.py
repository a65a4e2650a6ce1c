"""Prefix tuning in the Hugging Face PEFT format (``peft_type: PREFIX_TUNING``).

Weights: one tensor ``prompt_embeddings`` [P, L * 2 * H * hd], the prefixes as a table
(a reparameterized encoder is saved by its output, as PEFT does). Config: ``num_virtual_tokens``
P, ``num_layers`` L, ``num_attention_heads`` H (key/value heads), ``token_dim`` H * hd.
"""

import torch
from torch import nn

from ..prefix import attach
from ..prefix.attention import default_attention
from ..errors import PeftliteError

KEY = "prompt_embeddings"
TASK_TYPES = {"ForCausalLM": "CAUSAL_LM", "LMHeadModel": "CAUSAL_LM", "ForSequenceClassification": "SEQ_CLS",
              "ForTokenClassification": "TOKEN_CLS", "ForQuestionAnswering": "QUESTION_ANS",
              "ForConditionalGeneration": "SEQ_2_SEQ_LM"}


def task_type(model: nn.Module) -> str | None:
    """PEFT's task type for a Hugging Face model class (it picks the PeftModel class on load)."""
    name = type(model).__name__
    return next((task for suffix, task in TASK_TYPES.items() if name.endswith(suffix)), None)


def payload(model: nn.Module) -> tuple[dict, dict]:
    """``(tensors, config)`` describing the model's prefix."""
    encoder = attach.prefix_encoder(model)
    table = encoder.flat().detach().to("cpu").contiguous()
    width = encoder.num_heads * encoder.head_dim
    config = {
        "peft_type": "PREFIX_TUNING", "task_type": task_type(model),
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "num_virtual_tokens": encoder.prefix_len, "num_layers": encoder.num_layers,
        "num_attention_heads": encoder.num_heads, "token_dim": width, "encoder_hidden_size": width,
        "prefix_projection": False, "num_transformer_submodules": 1, "inference_mode": True,
    }
    modules = [(n, m) for n, m in model.named_modules() if n]
    if encoder.__dict__["targets"] != default_attention(modules):
        config["peftlite_targets"] = encoder.__dict__["targets"]
    return {KEY: table}, config


def load(model: nn.Module, config: dict, tensors: dict, source, name: str = "default"):
    """Check the file against the model; return the change (a callable) that installs prefix ``name`` (or
    refills the model's prefix of that name). Changes nothing itself."""
    extra = sorted(set(tensors) - {KEY})
    if KEY not in tensors or extra:
        raise PeftliteError(f"{source}: expected exactly one tensor '{KEY}' for prefix tuning, found "
                            f"{sorted(tensors)}.")
    if config.get("num_transformer_submodules", 1) != 1:
        raise PeftliteError(f"{source}: num_transformer_submodules={config['num_transformer_submodules']} "
                            "(encoder-decoder prefixes) is not supported.")
    table, prefix_len = tensors[KEY], config.get("num_virtual_tokens")
    layers, heads, width = config.get("num_layers"), config.get("num_attention_heads"), config.get("token_dim")
    if not all(isinstance(v, int) and v > 0 for v in (prefix_len, layers, heads, width)) or width % heads:
        raise PeftliteError(f"{source}: num_virtual_tokens, num_layers, num_attention_heads and token_dim must be "
                            f"positive integers with token_dim divisible by num_attention_heads; got {prefix_len}, "
                            f"{layers}, {heads}, {width}.")
    expected = (prefix_len, layers * 2 * width)
    if tuple(table.shape) != expected or not table.is_floating_point():
        raise PeftliteError(f"{source}: '{KEY}' has shape {tuple(table.shape)} and dtype {table.dtype}, the config "
                            f"needs floating-point {expected}.")
    encoder = attach.prefix_encoder(model)
    if encoder is None:
        targets = prefix_targets(model, config, source)
        shape = attach.plan_prefix(model, targets, prefix_len, None)
        check_shape(source, len(targets), shape, layers, heads, width)
    else:
        held = next(iter(model._modules[attach.SLOT]))
        if held != name:
            raise PeftliteError(f"{source}: the model already has prefix {held!r}, and one model holds one prefix; "
                                f"load this one as name={held!r} to replace its values, or delete it first.")
        check_shape(source, encoder.num_layers, (encoder.num_heads, encoder.head_dim), layers, heads, width)
        if encoder.prefix_len != prefix_len:
            raise PeftliteError(f"{source}: prefix_len {prefix_len}, the model's prefix has {encoder.prefix_len}. "
                                "Call peftlite.unload(model) first to load a different prefix.")

    def apply() -> None:
        installed = encoder
        if installed is None:
            installed = attach.install_prefix(model, targets, shape, prefix_len, None, name)
        else:
            installed.eject()
        with torch.no_grad():
            installed.prefix.copy_(table)
    return apply


def prefix_targets(model: nn.Module, config: dict, source: str) -> list[str]:
    """The attention modules a saved prefix goes to: the config's ``peftlite_targets`` (what ``save_adapter``
    wrote), each a module of the model, or without it the model's self-attention modules (PEFT's files)."""
    modules = [(n, m) for n, m in model.named_modules() if n]
    if "peftlite_targets" not in config:
        found = default_attention(modules)
        if not found:
            raise PeftliteError(f"{source}: the model has no attention module for the prefix (expected Hugging Face "
                                "or nn.MultiheadAttention self-attention).")
        return found
    targets, names = config["peftlite_targets"], {n for n, _ in modules}
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise PeftliteError(f"{source}: peftlite_targets={targets!r}: expected a non-empty list of module names.")
    missing = next((t for t in targets if t not in names), None)
    if missing is not None:
        raise PeftliteError(f"{source}: peftlite_targets names '{missing}', which the model does not have. Is this "
                            "adapter for another model?")
    return targets


def check_shape(source, count: int, shape: tuple[int, int], layers: int, heads: int, width: int) -> None:
    if count != layers or shape != (heads, width // heads):
        raise PeftliteError(f"{source}: the prefix is for {layers} layers of {heads} key/value heads x "
                            f"{width // heads}; the model has {count} attention layers of {shape[0]} x {shape[1]}. "
                            "Is this adapter for another model?")
