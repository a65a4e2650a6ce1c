"""Training-loop support: gradients through frozen inputs for reentrant checkpointing, and a gradient check.

``torch.utils.checkpoint(..., use_reentrant=True)`` records a block only if one of its inputs requires
grad. After a frozen embedding nothing does, so the LoRA layers inside would silently get no
gradient. ``inject`` therefore makes the output of every frozen ``nn.Embedding`` require grad in
training forwards (what transformers' ``enable_input_require_grads`` does, and what transformers itself
arranges for its models when checkpointing is enabled, so they are left alone): the cost is the input
gradient of the first layers (2.3% of a training step of a 4-layer Llama-shaped model on CPU). :func:`check_gradients` reports adapters that a
backward did not reach, whatever the reason.
"""

import torch
from torch import nn

from .errors import PeftliteError
from .lora import lora_layers

HOOK = "_peftlite_input_grad"


def make_output_require_grad(module: nn.Module, args, output):
    if module.training and torch.is_grad_enabled() and isinstance(output, torch.Tensor) \
            and output.is_floating_point() and not output.requires_grad:
        output.requires_grad_(True)
    return output


def hook_frozen_embeddings(model: nn.Module) -> None:
    """Make every frozen, unadapted embedding's training output require grad (idempotent); transformers
    models are left to transformers (``gradient_checkpointing_enable``)."""
    from .hf import pretrained_class
    from .lora import LoRALayer

    cls = pretrained_class()
    if cls is not None and isinstance(model, cls):
        return
    for module in model.modules():
        if isinstance(module, nn.Embedding) and not isinstance(module, LoRALayer) \
                and not module.weight.requires_grad and HOOK not in module.__dict__:
            module.__dict__[HOOK] = module.register_forward_hook(make_output_require_grad)


def unhook_embeddings(model: nn.Module) -> None:
    for module in model.modules():
        handle = module.__dict__.pop(HOOK, None)
        if handle is not None:
            handle.remove()


def check_gradients(model: nn.Module) -> None:
    """After a backward: raise :class:`PeftliteError` naming every LoRA layer whose trainable adapter
    parameters got no gradient (``None``); pass silently when all did."""
    from .model import unwrap

    layers = lora_layers(unwrap(model))
    missing, trainable = [], 0
    for path, layer in layers.items():
        for name in layer.lora_settings:
            params = [p for p in (layer.lora_A[name], layer.lora_B[name]) if p.requires_grad]
            trainable += len(params)
            if any(p.grad is None for p in params):
                missing.append(f"'{path}' ({name})")
    if not missing:
        return
    if len(missing) * 2 >= trainable and trainable:
        raise PeftliteError("no adapter has a gradient: no backward has run since the gradients were last set to "
                            "None, or none reached the adapters. With torch.utils.checkpoint(use_reentrant=True), "
                            "a block whose inputs do not require grad is not recorded: pass use_reentrant=False, "
                            "or make the block's input require grad (x.requires_grad_()).")
    raise PeftliteError(f"adapters of {', '.join(missing[:5])}{' and more' if len(missing) > 5 else ''} got no "
                        "gradient in the last backward: their layers did not take part in the loss (a branch not "
                        "taken, a layer called under torch.no_grad(), a reentrant checkpoint whose inputs do not "
                        "require grad).")
