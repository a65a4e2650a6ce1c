"""Keep ``nn.TransformerEncoderLayer`` off its fused inference path while it holds peftlite modules.

In eval mode, without gradients, ``nn.TransformerEncoderLayer`` may skip its submodules and run
one fused kernel on their weights (``torch._transformer_encoder_layer_fwd``), which would
silently drop LoRA, adapters and prefixes inside it. The layer stays on its regular path when
any module in it has a forward hook, so peftlite registers a no-op pre-hook on such layers;
``nn.TransformerEncoder`` gets ``use_nested_tensor = False`` for the same reason. Both are undone
once the layer holds no peftlite module.
"""

from torch import nn

GUARD = "_peftlite_fast_path_guard"
NESTED = "_peftlite_use_nested_tensor"


class FastPathGuard:
    """A forward pre-hook that does nothing; its presence keeps the fused fast path off."""

    def __call__(self, module, args):
        return None


def sync_fast_path_guards(model: nn.Module, adapted) -> None:
    """Guard every encoder layer that holds a module for which ``adapted(module)`` is true; release the rest."""
    for module in model.modules():
        if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerEncoder)):
            needed = any(adapted(m) for m in module.modules())
            (guard if needed else release)(module)


def guard(module: nn.Module) -> None:
    if isinstance(module, nn.TransformerEncoderLayer) and GUARD not in module.__dict__:
        module.__dict__[GUARD] = module.register_forward_pre_hook(FastPathGuard())
    if isinstance(module, nn.TransformerEncoder) and NESTED not in module.__dict__:
        module.__dict__[NESTED] = getattr(module, "use_nested_tensor", False)
        module.use_nested_tensor = False


def release(module: nn.Module) -> None:
    if GUARD in module.__dict__:
        module.__dict__.pop(GUARD).remove()
    if NESTED in module.__dict__:
        module.use_nested_tensor = module.__dict__.pop(NESTED)
