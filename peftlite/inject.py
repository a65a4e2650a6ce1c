"""inject / merge / unmerge / unload: LoRA, bottleneck adapters and prefix tuning over a whole model, in place.

Every function here validates everything first and only then changes the model, so a call that
raises :class:`PeftliteError` leaves the model exactly as it was.
"""

import inspect

from torch import nn

from . import prefix_tuning
from .adapter import Adapter, adapter_sizes, check_adapter_options
from .attention import MultiheadPrefixHook, default_attention
from .errors import PeftliteError
from .fast_path import sync_fast_path_guards
from .lora import LoRALinear, check_lora_options
from .prefix import PrefixEncoder
from .targets import attention_internals, find_targets, no_target_message, select_modules

METHODS = ("lora", "adapter", "prefix")


def inject(model: nn.Module, rank: int | None = None, *, method: str = "lora", targets=None, exclude=None,
           **options) -> nn.Module:
    """Add trainable adapters to ``model``, in place, and freeze everything else; return ``model``.

    ``method="lora"`` (default): wrap the target ``nn.Linear`` layers in :class:`LoRALinear`
    (``rank`` default 8; options ``alpha``, ``dropout``, ``rslora``, ``init``); ``targets=None``
    means every Linear but the output head.
    ``method="adapter"``: wrap each target module in an :class:`Adapter` (options as its
    constructor: ``dim``, ``bottleneck``, ``reduction_factor``, ``activation``, ``mode``,
    ``scaling``, ``dropout``, ``init``); ``targets`` is required.
    ``method="prefix"``: prefix tuning (options ``prefix_len``, ``projection_dim``);
    ``targets=None`` means every self-attention module.

    ``targets``/``exclude``: module names (exact or dotted suffix), a full-match regex, or a
    callable ``(name, module) -> bool`` (see ``peftlite.targets``). Parameters of other methods
    injected earlier stay trainable; every other parameter gets ``requires_grad=False``.
    """
    if method not in METHODS:
        raise PeftliteError(f"method={method!r}: expected one of {', '.join(map(repr, METHODS))}.")
    if rank is not None and method != "lora":
        raise PeftliteError(f"rank={rank!r} applies to method='lora' only; method={method!r} does not take it.")
    build = {"lora": inject_lora, "adapter": inject_adapters, "prefix": inject_prefix}[method]
    allowed = [p for p in inspect.signature(build).parameters if p not in ("model", "targets", "exclude")]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise PeftliteError(f"inject(method={method!r}) got unknown option(s) {', '.join(unknown)}; its options are "
                            f"{', '.join(allowed)}.")
    if method == "lora":
        options["rank"] = 8 if rank is None else rank
    build(model, targets=targets, exclude=exclude, **options)
    freeze_all_but_adapters(model)
    sync_fast_path_guards(model, is_adapted)
    return model


def inject_lora(model: nn.Module, rank: int = 8, *, alpha=None, targets=None, exclude=None, dropout: float = 0.0,
                rslora: bool = False, init: str = "default") -> None:
    check_lora_options(rank, alpha, dropout, init)
    names = find_targets(model, targets, exclude)
    wrap_each(model, names, lambda base: LoRALinear(base, rank, alpha=alpha, dropout=dropout, rslora=rslora,
                                                    init=init))


def inject_adapters(model: nn.Module, *, targets=None, exclude=None, dim=None, bottleneck=None,
                    reduction_factor: float = 16, activation: str = "relu", mode: str = "sequential", scaling=1.0,
                    dropout: float = 0.0, init: str = "default") -> None:
    options = dict(dim=dim, bottleneck=bottleneck, reduction_factor=reduction_factor, activation=activation,
                   mode=mode, scaling=scaling, dropout=dropout, init=init)
    check_adapter_options(**options)
    if targets is None:
        raise PeftliteError("inject(method='adapter') needs targets: the modules whose output gets an adapter. "
                            "Houlsby: targets=['o_proj', 'down_proj'] (Llama) or ['attention.output.dense', "
                            "'output.dense'] (BERT); Pfeiffer: the FFN output only. See docs/api/Adapter.md.")
    names, modules = select_modules(model, targets, exclude, default=lambda modules: [])
    if not names:
        raise PeftliteError(no_target_message(targets, exclude, modules))
    internals = attention_internals(model)
    for name in names:  # check all before wrapping any: wrapping adopts the module
        module = model.get_submodule(name)
        if name in internals:
            raise PeftliteError(f"module '{name}' belongs to an nn.MultiheadAttention, which never calls it, so an "
                                "adapter there would have no effect. Wrap the attention module itself instead.")
        try:
            adapter_sizes(module, dim, bottleneck, reduction_factor, mode)
        except PeftliteError as err:
            raise PeftliteError(f"module '{name}': {err}") from None
    wrap_each(model, names, lambda base: Adapter(base, **options))


def inject_prefix(model: nn.Module, *, targets=None, exclude=None, prefix_len: int = 10,
                  projection_dim: int | None = None) -> None:
    names, modules = select_modules(model, targets, exclude, default_attention)
    if not names:
        raise PeftliteError("found no attention module to give a prefix: expected nn.MultiheadAttention, Hugging "
                            "Face attention, or modules following peftlite.attention.PrefixAttention. "
                            + no_target_message(targets, exclude, modules))
    shape = prefix_tuning.plan_prefix(model, names, prefix_len, projection_dim)
    prefix_tuning.install_prefix(model, names, shape, prefix_len, projection_dim)


def wrap_each(model: nn.Module, names: list[str], wrap) -> None:
    """Replace each named module by ``wrap(module)``; a module reachable under several names gets one wrapper."""
    new = {}
    for name in names:
        base = model.get_submodule(name)
        if id(base) not in new:
            new[id(base)] = wrap(base)
    replace(model, {name: new[id(model.get_submodule(name))] for name in names})


def replace(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Set each qualified name in ``modules`` to its new module (and every other path to the same old one)."""
    swaps = {id(model.get_submodule(name)): module for name, module in modules.items()}
    for name, old in list(model.named_modules(remove_duplicate=False)):
        if name and id(old) in swaps:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, swaps[id(old)])


def adapter_parameters(model: nn.Module) -> set[int]:
    """ids of every trainable-by-design parameter: LoRA A/B, adapter bottlenecks, prefix encoders."""
    found = set()
    for module in model.modules():
        if isinstance(module, LoRALinear):
            found |= {id(module.lora_A), id(module.lora_B)}
        elif isinstance(module, Adapter):
            found |= {id(p) for p in module.adapter.parameters()}
        elif isinstance(module, PrefixEncoder):
            found |= {id(p) for p in module.parameters()}
    return found


def freeze_all_but_adapters(model: nn.Module) -> None:
    trainable = adapter_parameters(model)
    for param in model.parameters():
        if id(param) not in trainable:
            param.requires_grad_(False)


def is_adapted(module: nn.Module) -> bool:
    """Holds peftlite state that a fused kernel reading its weights directly would skip."""
    if isinstance(module, (LoRALinear, Adapter)):
        return True
    return any(isinstance(hook, MultiheadPrefixHook) for hook in module._forward_pre_hooks.values())


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every :class:`LoRALinear` in ``model`` (the model itself included) by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def require_lora(model: nn.Module, action: str) -> dict[str, LoRALinear]:
    layers = lora_layers(model)
    if not layers:
        raise PeftliteError(f"{action}: the model has no LoRA layers. Call peftlite.inject(model) "
                            "or peftlite.load_adapter(model, directory) first.")
    return layers


def adapter_modules(model: nn.Module) -> dict[str, Adapter]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Adapter)}


def unmergeable(model: nn.Module) -> str:
    """A phrase naming the model's adapters that cannot be merged into weights, or ''."""
    parts = [f"bottleneck adapter(s) at {', '.join(repr(n) for n in list(adapter_modules(model))[:3])}"] \
        if adapter_modules(model) else []
    if prefix_tuning.prefix_encoder(model) is not None:
        parts.append("prefix (model.prefix_encoder)")
    return " and ".join(parts)


def merge(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight, in place: ``W <- round(W + scaling * B A)``.

    Idempotent. Afterwards a forward through each layer costs one plain linear. The update is
    computed in float32 and rounded once into the weight's dtype. Checks all layers before
    changing any: if a merged weight would hold NaN or Inf, raises and changes nothing.
    Keeps one byte per merged weight element so that :func:`unmerge` is bit-exact.
    Bottleneck adapters and prefixes cannot be merged (they add computation, not a weight
    change); they stay as they are, and a model with nothing but them raises.
    """
    others = unmergeable(model)
    if not lora_layers(model) and others:
        raise PeftliteError(f"merge: the model's {others} cannot be merged into weights: they add computation of "
                            "their own. Keep them, or remove them with peftlite.unload(model) (which drops what "
                            "they learned; save_adapter first).")
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
    """Take every peftlite module out of ``model``, in place, and return the model.

    Each :class:`LoRALinear` becomes a plain ``nn.Linear``: with ``merge=True`` holding the
    merged weight ``W + scaling * B A``, with ``merge=False`` the original weight (unmerged
    first if needed). Bottleneck adapters and the prefix cannot be merged: they are removed and
    their modules left as before ``inject`` (save them with ``save_adapter`` first to keep them).
    The result's ``state_dict()`` has exactly the keys and shapes the model had before
    ``inject``. Parameters stay frozen as ``inject`` left them. If ``model`` is itself a
    ``LoRALinear`` or an ``Adapter``, the module it wrapped is returned instead.
    """
    layers, adapters = lora_layers(model), adapter_modules(model)
    if not layers and not adapters and prefix_tuning.prefix_encoder(model) is None:
        raise PeftliteError("unload: the model has no LoRA layers, adapters or prefix. Call peftlite.inject(model) "
                            "or peftlite.load_adapter(model, directory) first.")
    if layers:
        (merge_all if merge else unmerge)(model)
    if prefix_tuning.prefix_encoder(model) is not None:
        prefix_tuning.remove_prefix(model)
    plain = {name: as_linear(layer) for name, layer in layers.items()}
    plain.update({name: adapter.release() for name, adapter in adapters.items()})
    root = plain.pop("", None)
    replace(model, plain)
    sync_fast_path_guards(root if root is not None else model, is_adapted)
    return root if root is not None else model


def as_linear(layer: LoRALinear) -> nn.Linear:
    """A plain ``nn.Linear`` holding the layer's own weight and bias Parameters (no copy)."""
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    linear.weight = layer.weight
    linear.bias = layer.bias
    return linear
