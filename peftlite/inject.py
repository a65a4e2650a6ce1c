"""inject / merge / unmerge / unload: LoRA over a whole model, in place.

Every function here validates everything first and only then changes the model, so a call that
raises :class:`PeftliteError` leaves the model exactly as it was.
"""

from torch import nn

from .errors import PeftliteError
from .lora import LoRALinear, check_lora_options
from .targets import find_targets


def inject(model: nn.Module, rank: int = 8, *, alpha=None, targets=None, exclude=None, dropout: float = 0.0,
           rslora: bool = False, init: str = "default") -> nn.Module:
    """Wrap the target ``nn.Linear`` layers of ``model`` in :class:`LoRALinear`, in place.

    Every other parameter gets ``requires_grad=False``; LoRA parameters stay trainable. The
    model's ``state_dict()`` keeps all of its keys and gains ``<layer>.lora_A`` / ``.lora_B``.
    ``targets=None`` means every ``nn.Linear`` but the output head (see ``peftlite.targets``).
    Returns ``model`` itself.
    """
    check_lora_options(rank, alpha, dropout, init)
    names = find_targets(model, targets, exclude)
    new = {}
    for name in names:
        base = model.get_submodule(name)
        if id(base) not in new:  # a module reachable under several names gets one wrapper
            new[id(base)] = LoRALinear(base, rank, alpha=alpha, dropout=dropout, rslora=rslora, init=init)
    replace(model, {name: new[id(model.get_submodule(name))] for name in names})
    freeze_all_but_lora(model)
    return model


def replace(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Set each qualified name in ``modules`` to its new module (and every other path to the same old one)."""
    swaps = {id(model.get_submodule(name)): module for name, module in modules.items()}
    for name, old in list(model.named_modules(remove_duplicate=False)):
        if name and id(old) in swaps:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, swaps[id(old)])


def freeze_all_but_lora(model: nn.Module) -> None:
    adapter = {id(p) for layer in lora_layers(model).values() for p in (layer.lora_A, layer.lora_B)}
    for param in model.parameters():
        if id(param) not in adapter:
            param.requires_grad_(False)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every :class:`LoRALinear` in ``model`` (the model itself included) by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def require_lora(model: nn.Module, action: str) -> dict[str, LoRALinear]:
    layers = lora_layers(model)
    if not layers:
        raise PeftliteError(f"{action}: the model has no LoRA layers. Call peftlite.inject(model) "
                            "or peftlite.load_adapter(model, directory) first.")
    return layers


def merge(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight, in place: ``W <- round(W + scaling * B A)``.

    Idempotent. Afterwards a forward through each layer costs one plain linear. The update is
    computed in float32 and rounded once into the weight's dtype. Checks all layers before
    changing any: if a merged weight would hold NaN or Inf, raises and changes nothing.
    Keeps one byte per merged weight element so that :func:`unmerge` is bit-exact.
    """
    layers = require_lora(model, "merge")
    pending = [(name, layer) for name, layer in layers.items() if not layer.merged]
    for name, layer in pending:  # first pass: check only, so a bad layer changes nothing
        if not layer.merge_is_finite():
            raise PeftliteError(f"merging layer '{name}' gives NaN or Inf weights; no layer was changed. "
                                "Check its lora_A/lora_B for NaN/Inf or overflow in the weight's dtype.")
    for _, layer in pending:
        layer.commit_merge()
    return model


merge_all = merge  # unload's argument is called `merge`


def unmerge(model: nn.Module) -> nn.Module:
    """Take every merged LoRA update out again, restoring each base weight bit-exactly. Idempotent."""
    layers = require_lora(model, "unmerge")
    merged = [layer for layer in layers.values() if layer.merged]
    for name, layer in layers.items():
        if layer.merged and not layer.exactly_unmergeable():
            raise PeftliteError(f"layer '{name}': its weight, adapter, dtype or device changed while merged, so "
                                "its weight cannot be restored exactly; no layer was changed. Unmerge before "
                                "changing them.")
    for layer in merged:
        layer.unmerge()
    return model


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every :class:`LoRALinear` by a plain ``nn.Linear``, in place, and return the model.

    ``merge=True``: the Linear holds the merged weight ``W + scaling * B A``; ``merge=False``: the
    original weight (unmerged first if needed). The result's ``state_dict()`` has exactly the keys
    and shapes the model had before ``inject``. Parameters stay frozen as ``inject`` left them.
    If ``model`` is itself a ``LoRALinear``, the new ``nn.Linear`` is returned instead.
    """
    layers = require_lora(model, "unload")
    if merge:
        merge_all(model)
    else:
        unmerge(model)
    plain = {name: as_linear(layer) for name, layer in layers.items()}
    if "" in plain:
        return plain[""]
    replace(model, plain)
    return model


def as_linear(layer: LoRALinear) -> nn.Linear:
    """A plain ``nn.Linear`` holding the layer's own weight and bias Parameters (no copy)."""
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    linear.weight = layer.weight
    linear.bias = layer.bias
    return linear
