"""Training-loop helpers: gradients through frozen inputs for reentrant checkpointing, and a gradient check.

``torch.utils.checkpoint(..., use_reentrant=True)`` records a block only if one of its inputs requires
grad. After a frozen embedding nothing does, so the LoRA layers inside would silently get no
gradient. :func:`enable_input_require_grads` is the opt-in fix (what transformers'
``model.enable_input_require_grads()`` does for its own models; ``gradient_checkpointing_enable`` arranges
it there): the output of every frozen ``nn.Embedding`` requires grad in training forwards. ``inject``
does not do this by itself: it would cost the input gradient of the first layers in every step, and
a hook on a module ``inject`` does not adapt. Non-reentrant checkpointing (``use_reentrant=False``,
PyTorch's recommended mode, and the one ``torch.compile`` traces) needs nothing.
:func:`check_gradients` reports adapters that a backward did not reach, whatever the reason, and names
the helper.
"""

import torch
from torch import nn

from .errors import PeftliteError
from .lora import LoRALayer, lora_layers
from .model import unwrap


def make_output_require_grad(module: nn.Module, args, output):
    if module.training and torch.is_grad_enabled() and isinstance(output, torch.Tensor) \
            and output.is_floating_point() and not output.requires_grad:
        output.requires_grad_(True)
    return output


class InputGrads:
    """The hooks :func:`enable_input_require_grads` registered; ``.remove()`` takes them away."""

    def __init__(self, handles: list):
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def enable_input_require_grads(model: nn.Module) -> InputGrads:
    """Make the training output of every frozen ``nn.Embedding`` in ``model`` require grad, so that
    reentrant activation checkpointing records the blocks after it (and trains the LoRA layers
    inside). Returns a handle whose ``.remove()`` undoes it. Eager mode: under ``torch.compile`` use
    ``use_reentrant=False``, which needs no helper.
    """
    bare = unwrap(model)
    frozen = [m for m in bare.modules() if isinstance(m, nn.Embedding) and not isinstance(m, LoRALayer)
              and not m.weight.requires_grad]
    if not frozen:
        raise PeftliteError("enable_input_require_grads: the model has no frozen nn.Embedding, so there is no "
                            "frozen input to make require grad. Make the first checkpointed block's input require "
                            "grad yourself (x.requires_grad_()), or use use_reentrant=False.")
    return InputGrads([m.register_forward_hook(make_output_require_grad) for m in frozen])


def check_gradients(model: nn.Module) -> None:
    """After a backward: raise :class:`PeftliteError` naming every LoRA layer whose trainable adapter
    parameters got no gradient (``None``); pass silently when all did."""
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
                            "call peftlite.enable_input_require_grads(model) (a frozen embedding's output then "
                            "requires grad), or make the block's input require grad (x.requires_grad_()).")
    raise PeftliteError(f"adapters of {', '.join(missing[:5])}{' and more' if len(missing) > 5 else ''} got no "
                        "gradient in the last backward: their layers did not take part in the loss (a branch not "
                        "taken, a layer called under torch.no_grad(), a reentrant checkpoint whose inputs do not "
                        "require grad: peftlite.enable_input_require_grads(model) or use_reentrant=False).")
