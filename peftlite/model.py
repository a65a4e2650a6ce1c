"""inject / merge / unmerge / unload: LoRA, bottleneck adapters and prefix tuning over a whole model, in place.

Every function here validates everything first and only then changes the model, so a call that
raises :class:`PeftliteError` leaves the model exactly as it was. Each accepts a model wrapped by
``DistributedDataParallel`` (``.module``) or ``torch.compile`` (``._orig_mod``) and works on the
bare model inside.
"""

import inspect
import sys

from torch import nn

from . import events
from .bottleneck import Adapter, Bottleneck, adapter_sizes, bottleneck_size, check_adapter_options
from .errors import PeftliteError, check_adapter_name
from .fast_path import sync_fast_path_guards
from .sharding import refuse_sharded
from .lora import LoRALayer, add_lora, check_lora_options, lora_layers, plan_lora, release
from .prefix import PrefixEncoder
from .prefix import attach as prefix_attach
from .prefix.attention import MultiheadPrefixHook, default_attention
from .targets import (attention_internals, find_lora_targets, no_target_message, peftlite_internals, select_modules,
                      spec_matcher)

METHODS = ("lora", "adapter", "prefix")
TRAINED = "_peftlite_trained"  # set on a head module that trains with the adapters and is saved whole
TASK_HEADS = {  # Hugging Face task models whose head is new: it trains by default, as PEFT's task types do
    "ForSequenceClassification": ("classifier", "score"),
    "ForTokenClassification": ("classifier", "score"),
    "ForQuestionAnswering": ("qa_outputs",),
}


def unwrap(model) -> nn.Module:
    """The bare model inside ``DistributedDataParallel`` / ``torch.compile`` wrappers (any nesting)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif compiled(model):
            model = model._orig_mod
        else:
            break
    if not isinstance(model, nn.Module):
        raise PeftliteError(f"expected a torch.nn.Module, got {type(model).__name__}.")
    return model


def compiled(model) -> bool:
    """Whether ``model`` is ``torch.compile``'s wrapper (dynamo is loaded wherever one exists)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return eval_frame is not None and isinstance(model, eval_frame.OptimizedModule)


def refuse_meta(model: nn.Module, action: str) -> None:
    """Raise if the model holds parameters on the meta device: they hold no values to merge, save or fill."""
    name = next((n for n, p in model.named_parameters() if p.is_meta), None)
    if name is not None:
        raise PeftliteError(f"{action}: parameter '{name}' is on the meta device, which holds no values. "
                            "Materialize the model first (model.to_empty(device=...) and load its weights).")


def refuse_foreign(model: nn.Module, action: str) -> None:
    """Raise if ``model`` holds another library's adapters (HF PEFT's ``PeftModel`` or tuner layers): peftlite
    would adapt their ``lora_A``/``lora_B`` Linears and freeze them, silently."""
    found = next(((name, m) for name, m in model.named_modules() if type(m).__module__.split(".")[0] == "peft"), None)
    if found is not None:
        name, module = found
        raise PeftliteError(f"{action}: the model holds HF PEFT's {type(module).__name__} at '{name or '(root)'}'; "
                            "peftlite does not adapt another library's adapters. Take them out first: "
                            "model = model.merge_and_unload() (PEFT's adapters merged into the weights) or "
                            "model = model.unload() (dropped; model.get_base_model() still holds PEFT's layers). "
                            "A saved PEFT adapter loads with peftlite.load_adapter(model, directory).")


def inject(model: nn.Module, rank: int | None = None, *, method: str = "lora", targets=None, exclude=None,
           trainable=None, **options) -> nn.Module:
    """Add trainable adapters to ``model``, in place, and freeze everything else; return ``model``.

    ``method="lora"`` (default): LoRA on the target layers (``rank`` default 8; options ``alpha``,
    ``dropout``, ``rslora``, ``init``, ``name`` (default ``"default"``), ``adapter_dtype``);
    ``targets=None`` means every Linear-like layer (Linear and subclasses, transformers' Conv1D)
    but the output head; Embedding and Conv layers when named. Adapters are float32 on 16-bit
    bases unless ``adapter_dtype`` says otherwise.
    ``method="adapter"``: wrap each target module in an :class:`Adapter` (options as its
    constructor: ``dim``, ``bottleneck``, ``reduction_factor``, ``activation``, ``mode``,
    ``scaling``, ``dropout``, ``init``, ``name``); ``targets`` is required.
    ``method="prefix"``: prefix tuning (options ``prefix_len``, ``projection_dim``, ``name``);
    ``targets=None`` means every self-attention module. Every method names its adapter (``name``,
    default ``"default"``): it is one component of the adapter's state-dict keys.

    ``targets``/``exclude``: module names (exact or dotted suffix), a full-match regex, or a
    callable ``(name, module) -> bool`` (see ``peftlite.targets``). ``trainable``: names of
    modules that train whole beside the adapters and are saved whole (PEFT's ``modules_to_save``);
    ``None`` means the new head of a Hugging Face task model (``classifier``, ``score``,
    ``qa_outputs`` of ``*ForSequenceClassification``, ``*ForTokenClassification``,
    ``*ForQuestionAnswering``), ``[]`` none. A model may hold several adapters under different
    names: the new one joins the active set, and the adapters active before stay active and
    trainable (``peftlite.set_adapter`` picks). Parameters of active adapters, the prefix and
    trained heads train; every other parameter gets ``requires_grad=False``.
    """
    bare = unwrap(model)
    refuse_in_context(bare, "inject")
    refuse_foreign(bare, "inject")
    refuse_sharded(bare, "inject", "Inject before fully_shard: FSDP2 shards the adapters with the rest.")
    if method not in METHODS:
        raise PeftliteError(f"method={method!r}: expected one of {', '.join(map(repr, METHODS))}.")
    if rank is not None and method != "lora":
        raise PeftliteError(f"rank={rank!r} applies to method='lora' only; method={method!r} does not take it.")
    build = {"lora": inject_lora, "adapter": inject_adapters, "prefix": inject_prefix}[method]
    allowed = [p for p in inspect.signature(build).parameters if p not in ("model", "targets", "exclude", "trained")]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise PeftliteError(f"inject(method={method!r}) got unknown option(s) {', '.join(unknown)}; its options are "
                            f"{', '.join(allowed)}.")
    if method == "lora":
        options["rank"] = 8 if rank is None else rank
    trained = trained_heads(bare, trainable)
    build(bare, targets=targets, exclude=exclude, trained=trained | marked_heads(bare), **options)
    for name in trained:
        bare.get_submodule(name).__dict__[TRAINED] = True
    freeze_all_but_adapters(bare)
    sync_fast_path_guards(bare, is_adapted)
    events.adapted(bare)
    return model


def inject_lora(model: nn.Module, rank: int = 8, *, alpha=None, targets=None, exclude=None, dropout: float = 0.0,
                rslora: bool = False, init: str = "default", name: str = "default", adapter_dtype=None,
                trained: set[str] = frozenset()) -> None:
    check_lora_options(rank, alpha, dropout, init, rslora)
    plans = {}
    for path in find_lora_targets(model, targets, exclude, trained):
        module = model.get_submodule(path)
        if id(module) not in plans:  # a module reachable under several paths gets one adapter
            plans[id(module)] = module, plan_lora(path, module, name, rank, alpha, dropout, rslora, init,
                                                  adapter_dtype)
    for module, plan in plans.values():
        add_lora(module, *plan)


def inject_adapters(model: nn.Module, *, targets=None, exclude=None, dim=None, bottleneck=None,
                    reduction_factor: float = 16, activation: str = "relu", mode: str = "sequential", scaling=1.0,
                    dropout: float = 0.0, init: str = "default", name: str = "default",
                    trained: set[str] = frozenset()) -> None:
    options = dict(dim=dim, bottleneck=bottleneck, reduction_factor=reduction_factor, activation=activation,
                   mode=mode, scaling=scaling, dropout=dropout, init=init)
    check_adapter_name(name)
    check_adapter_options(**options)
    if targets is None:
        raise PeftliteError("inject(method='adapter') needs targets: the modules whose output gets an adapter. "
                            "Houlsby: targets=['o_proj', 'down_proj'] (Llama) or ['attention.output.dense', "
                            "'output.dense'] (BERT); Pfeiffer: the FFN output only. See docs/api/Adapter.md.")
    names, modules = select_modules(model, targets, exclude, default=lambda modules: [])
    if not names:
        raise PeftliteError(no_target_message(targets, exclude, modules))
    internals, own = attention_internals(model), peftlite_internals(model)
    for path in names:  # check all before wrapping any: wrapping adopts the module
        module = model.get_submodule(path)
        if path in internals:
            raise PeftliteError(f"module '{path}' belongs to an nn.MultiheadAttention, which never calls it, so an "
                                "adapter there would have no effect. Wrap the attention module itself instead.")
        if path in own:
            raise PeftliteError(f"module '{path}' belongs to a peftlite module; leave it out of targets.")
        if path in trained or any(path.startswith(head + ".") for head in trained):
            raise PeftliteError(f"module '{path}' is (inside) a trained head, saved whole; leave it out of targets, "
                                "or pass trainable=[] to adapt it instead.")
        try:
            if isinstance(module, Adapter):
                check_another_bottleneck(module, name, dim, bottleneck, reduction_factor, mode)
            else:
                adapter_sizes(module, dim, bottleneck, reduction_factor, mode)
        except PeftliteError as err:
            raise PeftliteError(f"module '{path}': {err}") from None
    extend = [path for path in names if isinstance(model.get_submodule(path), Adapter)]
    for module in {id(m): m for m in map(model.get_submodule, extend)}.values():
        size = bottleneck if bottleneck is not None else bottleneck_size(module.dim, reduction_factor)
        module.add(name, size, activation, scaling, dropout, init)
    fresh = [path for path in names if path not in extend]
    if fresh:
        wrap_each(model, fresh, lambda base: Adapter(base, **options, name=name))


def check_another_bottleneck(module: Adapter, name: str, dim, bottleneck, reduction_factor, mode) -> None:
    """Raise unless the wrapper ``module`` can take bottleneck ``name`` beside those it holds."""
    if name in module.adapter:
        raise PeftliteError(f"it already has a bottleneck adapter named {name!r}; pick another name or remove it "
                            "first with peftlite.delete_adapter(model, name)")
    if mode != module.mode:
        raise PeftliteError(f"its adapters run in mode={module.mode!r}; a second adapter on one module must use the "
                            f"same mode (got {mode!r})")
    if dim is not None and dim != module.dim:
        raise PeftliteError(f"dim={dim} does not match its adapters' dim {module.dim}; leave dim out")
    if bottleneck is None:
        bottleneck_size(module.dim, reduction_factor)


def inject_prefix(model: nn.Module, *, targets=None, exclude=None, prefix_len: int = 10,
                  projection_dim: int | None = None, name: str = "default", trained: set[str] = frozenset()) -> None:
    check_adapter_name(name)
    names, modules = select_modules(model, targets, exclude, default_attention)
    if not names:
        raise PeftliteError("found no attention module to give a prefix: expected nn.MultiheadAttention, Hugging "
                            "Face attention, or modules following peftlite.prefix.attention.PrefixAttention. "
                            + no_target_message(targets, exclude, modules))
    shape = prefix_attach.plan_prefix(model, names, prefix_len, projection_dim)
    prefix_attach.install_prefix(model, names, shape, prefix_len, projection_dim, name)


def trained_heads(model: nn.Module, trainable) -> set[str]:
    """Names of the modules ``trainable`` asks to train whole (see :func:`inject`); checks, changes nothing."""
    if trainable is None:
        suffix = next((s for s in TASK_HEADS if type(model).__name__.endswith(s)), None)
        return {name for name in TASK_HEADS.get(suffix, ()) if isinstance(model._modules.get(name), nn.Module)}
    if not isinstance(trainable, (list, tuple, set, frozenset)) or not all(isinstance(e, str) for e in trainable):
        raise PeftliteError(f"trainable={trainable!r}: expected a list of module names (exact or dotted suffix), "
                            "[] for none, or None for the head of a Hugging Face task model.")
    if not trainable:
        return set()
    modules = [(name, m) for name, m in model.named_modules() if name]
    match = spec_matcher(list(trainable), "trainable", modules)
    chosen = {name for name, m in modules if match(name, m)}
    own = peftlite_internals(model)
    for name in sorted(chosen):
        module = model.get_submodule(name)
        if isinstance(module, (LoRALayer, Adapter, Bottleneck, PrefixEncoder)) or name in own:
            raise PeftliteError(f"trainable entry '{name}' is an adapted or peftlite module; name a plain module "
                                "(a head or a norm) to train whole.")
        if any(isinstance(m, (LoRALayer, Adapter)) for m in module.modules()):
            raise PeftliteError(f"trainable entry '{name}' contains adapted layers; a module trained whole cannot "
                                "also hold adapters. Name a module without them.")
        if next(module.parameters(), None) is None:
            raise PeftliteError(f"trainable entry '{name}' ({type(module).__name__}) has no parameters to train.")
    return {name for name in chosen if not any(name.startswith(other + ".") for other in chosen)}


def marked_heads(model: nn.Module) -> set[str]:
    """Names of modules marked as trained heads by an earlier ``inject`` or ``load_adapter``."""
    return {name for name, m in model.named_modules() if m.__dict__.get(TRAINED)}


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


def adapter_parameters(model: nn.Module, active_only: bool = False) -> set[int]:
    """ids of every trainable-by-design parameter: LoRA A/B, bottlenecks, prefix encoders, trained heads
    (with ``active_only``, of the active adapters only)."""
    found = set()
    for module in model.modules():
        if isinstance(module, LoRALayer):
            names = module.lora_active if active_only else module.lora_settings
            found |= {id(p) for n in names for p in (module.lora_A[n], module.lora_B[n])}
        elif isinstance(module, Adapter):
            names = module.adapter_active if active_only else module.adapter
            found |= {id(p) for n in names for p in module.adapter[n].parameters()}
        elif isinstance(module, PrefixEncoder) or module.__dict__.get(TRAINED):
            found |= {id(p) for p in module.parameters()}
    return found


def freeze_all_but_adapters(model: nn.Module) -> None:
    """Only the active adapters, the prefix and trained heads train."""
    trainable = adapter_parameters(model, active_only=True)
    for param in model.parameters():
        param.requires_grad_(id(param) in trainable)


CONTEXT = "_peftlite_context"  # on the bare model while disable_adapters / adapter_per_row is entered


def refuse_in_context(model: nn.Module, action: str) -> None:
    """Raise if ``model`` is inside ``disable_adapters`` or ``adapter_per_row``, which restore its state on exit."""
    context = model.__dict__.get(CONTEXT)
    if context is not None:
        raise PeftliteError(f"{action} inside peftlite.{context}(model): leaving the context restores the adapters as "
                            "they were on entry, so changing them inside is refused. Exit the context first.")


def is_adapted(module: nn.Module) -> bool:
    """Holds peftlite state that a fused kernel reading its weights directly would skip."""
    if isinstance(module, (LoRALayer, Adapter)):
        return True
    return any(isinstance(hook, MultiheadPrefixHook) for hook in module._forward_pre_hooks.values())


def require_lora(model: nn.Module, action: str) -> dict[str, LoRALayer]:
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
    if prefix_attach.prefix_encoder(model) is not None:
        parts.append("prefix (model.prefix_encoder)")
    return " and ".join(parts)


def storage_key(tensor) -> tuple:
    """What two tensors share when writing one changes the other: their storage (two Parameter objects over
    one storage, as ``load_state_dict(tied, assign=True)`` leaves, are tied as much as one shared Parameter)."""
    if tensor.is_meta or not tensor.numel():  # no storage to share
        return ("object", id(tensor))
    return (tensor.device, tensor.untyped_storage().data_ptr())


def check_unshared(model: nn.Module, layers: dict[str, LoRALayer]) -> None:
    """Refuse to merge a weight whose storage another module holds too (tied weights): the merge would change it."""
    holders: dict[tuple, dict[int, str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for key, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is not None:
                holders.setdefault(storage_key(tensor), {}).setdefault(id(module), f"{name}.{key}" if name else key)
    for name, layer in layers.items():
        others = [path for owner, path in holders.get(storage_key(layer.weight), {}).items() if owner != id(layer)]
        if others:
            raise PeftliteError(f"merge: the weight of LoRA layer '{name}' is shared with '{others[0]}' (tied "
                                "weights), so merging would change that module too; no layer was changed. Keep the "
                                "model unmerged (its forward is correct), or untie the weights first.")


def merge(model: nn.Module, names=None) -> nn.Module:
    """Fold LoRA updates into their base weights, in place: ``W <- round(W + delta)``.

    ``names``: the LoRA adapters to fold in (a name or a list), default the active ones; each
    must be active (a merged adapter computes). Idempotent; layers already holding merged
    adapters get the union. Afterwards a forward through each layer costs its plain base forward
    plus the terms of active adapters left unmerged. The update is computed in float32 and rounded
    once into the weight's dtype. Checks all layers before changing any: a merged weight that would
    hold NaN or Inf, or a weight shared with another module (tied weights), raises and changes
    nothing. Keeps one byte per merged weight element so that :func:`unmerge` is bit-exact.
    Bottleneck adapters and prefixes cannot be merged (they add computation, not a weight change);
    they stay as they are, and a model with nothing but them raises.
    """
    bare = unwrap(model)
    refuse_in_context(bare, "merge")
    refuse_meta(bare, "merge")
    refuse_sharded(bare, "merge", "Merge before fully_shard, or save_adapter (on every rank) and merge the saved "
                   "checkpoint with `peftlite merge`.")
    others = unmergeable(bare)
    if not lora_layers(bare) and others:
        raise PeftliteError(f"merge: the model's {others} cannot be merged into weights: they add computation of "
                            "their own. Keep them, or remove them with peftlite.unload(model) (which drops what "
                            "they learned; save_adapter first).")
    layers = require_lora(bare, "merge")
    wanted = merge_names(bare, layers, names)
    plans = {}
    for path, layer in layers.items():
        merged = layer.lora_merge.names if layer.merged else ()
        target = [n for n in layer.lora_settings if n in merged or (n in wanted and n in layer.lora_active)]
        if list(merged) != target:
            plans[path] = layer, target
    for path, (layer, _) in plans.items():
        layer.check_mergeable(f"merge: layer '{path}'")
    check_unshared(bare, {path: layer for path, (layer, _) in plans.items()})
    remerge(plans, "merge")
    return model


merge_all = merge  # unload's argument is called `merge`


def merge_names(model: nn.Module, layers: dict[str, LoRALayer], names) -> list[str]:
    """The LoRA adapters ``merge(model, names)`` folds in: checked, in the model's order."""
    present = list(dict.fromkeys(n for layer in layers.values() for n in layer.lora_settings))
    active = [n for n in present if any(n in layer.lora_active for layer in layers.values())]
    if names is None:
        if not active:
            raise PeftliteError("merge: no LoRA adapter is active, so there is nothing to merge. "
                                f"peftlite.set_adapter(model, ...) picks among {present}.")
        return active
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
        raise PeftliteError(f"names={names!r}: expected an adapter name or a non-empty list of them "
                            f"(LoRA adapters of this model: {present}), or None for the active ones.")
    for name in names:
        if name not in present:
            raise PeftliteError(f"merge: the model has no LoRA adapter named {name!r}; its LoRA adapters are "
                                f"{present} (bottleneck adapters and prefixes cannot be merged).")
        if name not in active:
            raise PeftliteError(f"merge: adapter {name!r} is not active, and a merged adapter computes. "
                                f"Activate it first: peftlite.set_adapter(model, [...]) (active now: {active}).")
    return [n for n in present if n in names]


def remerge(plans: dict[str, tuple[LoRALayer, list[str]]], action: str) -> None:
    """Give each layer exactly the merged adapters of its plan, bit-exactly, or change nothing.

    Each touched layer is unmerged (checked first), checked for a finite merge of its new set, and
    merged again; if one would hold NaN or Inf, every layer gets its previous state back (unmerge
    and merge are exact inverses) and the call raises.
    """
    for path, (layer, _) in plans.items():
        if layer.merged and not layer.exactly_unmergeable():
            raise PeftliteError(f"layer '{path}': its weight, adapter, dtype or device changed while merged, so "
                                f"its weight cannot be restored exactly; no layer was changed ({action}). Unmerge "
                                "before changing them.")
    previous = {path: layer.lora_merge.names if layer.merged else () for path, (layer, _) in plans.items()}
    for layer, _ in plans.values():
        if layer.merged:
            layer.commit_unmerge()
    failed = next((path for path, (layer, target) in plans.items() if target and not layer.merge_is_finite(target)),
                  None)
    if failed is not None:
        for path, (layer, _) in plans.items():
            if previous[path]:
                layer.commit_merge(list(previous[path]))
        raise PeftliteError(f"{action}: merging layer '{failed}' gives NaN or Inf weights; no layer was changed. "
                            "Check its lora_A/lora_B for NaN/Inf or overflow in the weight's dtype.")
    for layer, target in plans.values():
        if target:
            layer.commit_merge(target)


def unmerge(model: nn.Module, names=None) -> nn.Module:
    """Take merged LoRA updates out again, restoring each base weight bit-exactly. Idempotent.

    ``names``: the adapters to take out (a name or a list), default all; the others stay merged.
    """
    bare = unwrap(model)
    refuse_in_context(bare, "unmerge")
    refuse_sharded(bare, "unmerge", "Unmerge before fully_shard.")
    layers = require_lora(bare, "unmerge")
    if names is not None:
        names = [names] if isinstance(names, str) else names
        present = list(dict.fromkeys(n for layer in layers.values() for n in layer.lora_settings))
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n in present for n in names):
            raise PeftliteError(f"names={names!r}: expected LoRA adapter names of this model ({present}), or None "
                                "for all.")
    plans = {}
    for path, layer in layers.items():
        if layer.merged:
            keep = [n for n in layer.lora_merge.names if names is not None and n not in names]
            if keep != list(layer.lora_merge.names):
                plans[path] = layer, keep
    remerge(plans, "unmerge")
    return model


def unload(model: nn.Module, merge: bool = True, names=None) -> nn.Module:
    """Take every peftlite module out of ``model``, in place, and return the bare model.

    Each LoRA layer gets its original class back (``nn.Linear``, ``Conv1D``, ...): with
    ``merge=True`` holding the weight with adapters ``names`` merged (default: the active ones,
    as :func:`merge`; other adapters are dropped), with ``merge=False`` the original weight
    (unmerged first if needed). Bottleneck adapters and the prefix cannot be merged: they are removed and
    their modules left as before ``inject`` (save them with ``save_adapter`` first to keep them).
    The result's ``state_dict()`` has exactly the keys and shapes the model had before
    ``inject``. Parameters stay frozen as ``inject`` left them. If ``model`` is itself an
    ``Adapter``, the module it wrapped is returned instead.
    """
    bare = unwrap(model)
    refuse_in_context(bare, "unload")
    refuse_sharded(bare, "unload", "save_adapter (on every rank) and merge the saved checkpoint with `peftlite "
                   "merge`, or unload an unsharded copy of the model.")
    if not isinstance(merge, bool):
        raise PeftliteError(f"merge={merge!r}: expected True (fold the adapters in) or False (drop them).")
    if names is not None and not merge:
        raise PeftliteError(f"names={names!r} picks the adapters to merge; with merge=False every adapter is dropped.")
    layers, adapters = lora_layers(bare), adapter_modules(bare)
    if not layers and not adapters and prefix_attach.prefix_encoder(bare) is None:
        raise PeftliteError("unload: the model has no LoRA layers, adapters or prefix. Call peftlite.inject(model) "
                            "or peftlite.load_adapter(model, directory) first.")
    if layers and merge and (names is not None or any(layer.lora_active for layer in layers.values())):
        merge_all(bare, names)
        wanted = merge_names(bare, layers, names)
        present = dict.fromkeys(n for layer in layers.values() for n in layer.lora_settings)
        unmerge(bare, [n for n in present if n not in wanted])  # what was merged beyond them is dropped
    elif layers:
        unmerge(bare)
    if prefix_attach.prefix_encoder(bare) is not None:
        prefix_attach.remove_prefix(bare)
    for layer in layers.values():
        release(layer)
    for module in bare.modules():
        module.__dict__.pop(TRAINED, None)
    plain = {name: adapter.release() for name, adapter in adapters.items()}
    root = plain.pop("", None)
    replace(bare, plain)
    result = root if root is not None else bare
    sync_fast_path_guards(result, is_adapted)
    events.released(bare)
    return result

