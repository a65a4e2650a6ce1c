"""Several named adapters in one model: list, switch, disable, delete, per-row batches, summary.

Every adapter has a name (``inject(..., name=)``, default ``"default"``) that is one component of
its state-dict keys. Each LoRA layer and bottleneck wrapper keeps its active names; the outputs
of the active adapters add up:

    y = base(x) + sum over active adapters n of term_n(x)

:func:`set_adapter` picks the active set (only active adapters train), :func:`disable_adapters`
computes the base function for a while, :func:`adapter_per_row` gives each row of a batch its
own adapter (forward and backward), :func:`delete_adapter` removes one. Prefix tuning holds one
prefix per model, which stays on: it is listed and deleted by name, but cannot be switched off.
"""

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from . import events
from .bottleneck import Adapter
from .errors import PeftliteError
from .fast_path import sync_fast_path_guards
from .lora import LoRALayer, lora_layers, remove_lora
from .model import (CONTEXT, TRAINED, adapter_modules, is_adapted, refuse_in_context, replace, unwrap)
from .ops.row_mix import RowMix
from .prefix import attach as prefix_attach


def lora_names(model: nn.Module, layers=None) -> list[str]:
    layers = lora_layers(model) if layers is None else layers
    return list(dict.fromkeys(n for layer in layers.values() for n in layer.lora_settings))


def bottleneck_names(model: nn.Module, wrappers=None) -> list[str]:
    wrappers = adapter_modules(model) if wrappers is None else wrappers
    return list(dict.fromkeys(n for adapter in wrappers.values() for n in adapter.adapter))


def prefix_names(model: nn.Module) -> list[str]:
    return list(model._modules[prefix_attach.SLOT]) if prefix_attach.prefix_encoder(model) is not None else []


def adapter_names(model: nn.Module, layers=None, wrappers=None) -> list[str]:
    """Every adapter name in ``model`` (LoRA, bottleneck, prefix), in the order they first appear."""
    bare = unwrap(model)
    return list(dict.fromkeys([*lora_names(bare, layers), *bottleneck_names(bare, wrappers), *prefix_names(bare)]))


def active_adapters(model: nn.Module) -> list[str]:
    """The names whose adapters the model's forward applies (the prefix is always on)."""
    bare = unwrap(model)
    active = {n for layer in lora_layers(bare).values() for n in layer.lora_active}
    active |= {n for adapter in adapter_modules(bare).values() for n in adapter.adapter_active}
    return [n for n in adapter_names(bare) if n in active or n in prefix_names(bare)]


def check_names(model: nn.Module, names, action: str, allow_none: bool = False, present=None) -> list:
    """``names`` as a list, each an adapter of the model (or None where ``allow_none``); raises otherwise."""
    names = [names] if isinstance(names, str) else names
    present = adapter_names(model) if present is None else present
    if not isinstance(names, (list, tuple)) or not names:
        raise PeftliteError(f"{action}: names={names!r}: expected an adapter name or a non-empty list of them; "
                            f"this model's adapters are {present}.")
    for name in names:
        if name is None and allow_none:
            continue
        if not isinstance(name, str) or name not in present:
            raise PeftliteError(f"{action}: {name!r} is not an adapter of this model; its adapters are {present}"
                                + (" (None: the base alone)." if allow_none else "."))
    return list(names)


def require_adapters(model: nn.Module, action: str, present=None) -> None:
    if not (adapter_names(model) if present is None else present):
        raise PeftliteError(f"{action}: the model has no adapters. Call peftlite.inject(model) or "
                            "peftlite.load_adapter(model, directory) first.")


def refuse_merged(model: nn.Module, action: str, names=None, layers=None) -> None:
    """Raise if a LoRA layer holds merged adapters (of ``names``, if given)."""
    for path, layer in (lora_layers(model) if layers is None else layers).items():
        merged = layer.lora_merge.names if layer.merged else ()
        if any(names is None or n in names for n in merged):
            raise PeftliteError(f"{action}: layer '{path}' holds merged adapter(s) {list(merged)}; call "
                                "peftlite.unmerge(model) first.")


def set_adapter(model: nn.Module, names) -> nn.Module:
    """Make ``names`` (a name or a list) the active adapters, in place; return ``model``.

    The outputs of active adapters add up; only their parameters require grad (the prefix and
    trained heads keep training). Layers without any of the names compute their base function.
    Refused while adapters are merged (a merged adapter cannot be switched off), and if the
    model has a prefix that ``names`` leaves out (it cannot be switched off).
    """
    bare = unwrap(model)
    refuse_in_context(bare, "set_adapter")
    layers, wrappers = lora_layers(bare), adapter_modules(bare)
    present = adapter_names(bare, layers, wrappers)
    require_adapters(bare, "set_adapter", present)
    names = check_names(bare, names, "set_adapter", present=present)
    if len(set(names)) != len(names):
        raise PeftliteError(f"set_adapter: names={names!r} lists an adapter twice.")
    refuse_merged(bare, "set_adapter", layers=layers)
    left_out = [n for n in prefix_names(bare) if n not in names]
    if left_out:
        raise PeftliteError(f"set_adapter: the model's prefix {left_out[0]!r} is always on and must be among the "
                            "active names; remove it with peftlite.delete_adapter(model, name) instead.")
    for layer in layers.values():
        layer.lora_active = tuple(n for n in layer.lora_settings if n in names)
    for adapter in wrappers.values():
        adapter.adapter_active = tuple(n for n in adapter.adapter if n in names)
    train_only(bare, names, layers, wrappers)
    return model


def train_only(model: nn.Module, names, layers=None, wrappers=None) -> None:
    """``requires_grad`` of every LoRA and bottleneck parameter: True for adapters in ``names``, else False."""
    for layer in (lora_layers(model) if layers is None else layers).values():
        for part in (layer.lora_A, layer.lora_B):
            for n, param in part.items():
                param.requires_grad_(n in names)
    for adapter in (adapter_modules(model) if wrappers is None else wrappers).values():
        for n, bottleneck in adapter.adapter.items():
            bottleneck.requires_grad_(n in names)


def adapter_flags(layers: dict, wrappers: dict) -> list[tuple[torch.Tensor, bool]]:
    params = [p for layer in layers.values() for p in (*layer.lora_A.values(), *layer.lora_B.values())]
    params += [p for adapter in wrappers.values() for p in adapter.adapter.parameters()]
    return [(p, p.requires_grad) for p in params]


@contextlib.contextmanager
def entered(model: nn.Module, context: str):
    """Mark ``model`` as inside ``context`` (other changes are refused meanwhile) until the block ends."""
    model.__dict__[CONTEXT] = context
    try:
        yield
    finally:
        model.__dict__.pop(CONTEXT, None)


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Inside the block, ``model`` computes exactly its base function; everything is restored on exit.

    Bit-identical to the model before ``inject``: merged LoRA layers are unmerged (exactly) on
    entry and merged again on exit, active sets emptied and restored, exceptions included. The
    reference logits of DPO-style training::

        with peftlite.disable_adapters(model), torch.no_grad():
            reference = model(**batch).logits

    Models with a prefix are refused (a prefix cannot be switched off).
    """
    bare = unwrap(model)
    refuse_in_context(bare, "disable_adapters")
    require_adapters(bare, "disable_adapters")
    if prefix_names(bare):
        raise PeftliteError("disable_adapters: the model has a prefix (model.prefix_encoder), which cannot be "
                            "switched off. Keep a copy of the base model for reference outputs, or use LoRA.")
    layers, wrappers = lora_layers(bare), adapter_modules(bare)
    for path, layer in layers.items():
        if layer.merged and not layer.exactly_unmergeable():
            raise PeftliteError(f"disable_adapters: layer '{path}': its weight or adapter changed while merged, so "
                                "its base weight cannot be restored exactly; nothing was changed.")
    merged = {path: layer.lora_merge.names for path, layer in layers.items() if layer.merged}
    actives = ({path: layer.lora_active for path, layer in layers.items()},
               {path: adapter.adapter_active for path, adapter in wrappers.items()})
    for path in merged:
        layers[path].commit_unmerge()
    for layer in layers.values():
        layer.lora_active = ()
    for adapter in wrappers.values():
        adapter.adapter_active = ()
    try:
        with entered(bare, "disable_adapters"):
            yield model
    finally:
        for path, layer in layers.items():
            layer.lora_active = actives[0][path]
        for path, adapter in wrappers.items():
            adapter.adapter_active = actives[1][path]
        for path, names in merged.items():
            layers[path].commit_merge(list(names))


@contextlib.contextmanager
def adapter_per_row(model: nn.Module, names):
    """Inside the block, row i of the batch goes through adapter ``names[i]`` (``None``: the base alone).

    Rows are the leading axis of what each layer sees: [B, T, ...] or flattened [B*T, ...]
    (tokens of a row contiguous). The choice holds in forward and backward: each adapter's
    gradients come from its own rows only. The rows are grouped once, on entry, into a mask and a
    slot per row for each layer; each LoRA layer then runs all its adapters in one set of ops,
    stacked (ranks side by side, other rows' columns masked) or gathered (each row's own A and B,
    batched products), see ``ops/row_mix.py``; no Python loop over rows, no per-layer index lists.
    Works under ``torch.compile(fullgraph=True)``; every adapter of a layer takes part (masked when
    unused), so a compiled model serving one batch after another does not recompile. Entered with
    gradients enabled (training), the adapters named train and the others are frozen for the
    block; entered under ``torch.no_grad()`` (serving), no ``requires_grad`` flag changes. LoRA and
    bottleneck adapters; refused while merged, and for prefixes.

    >>> with peftlite.adapter_per_row(model, ["a", "b", None, "a"]):
    ...     logits = model(input_ids).logits      # input_ids: [4, T]
    """
    bare = unwrap(model)
    refuse_in_context(bare, "adapter_per_row")
    layers, wrappers = lora_layers(bare), adapter_modules(bare)
    present = adapter_names(bare, layers, wrappers)
    require_adapters(bare, "adapter_per_row", present)
    rows = check_names(bare, names, "adapter_per_row", allow_none=True, present=present)
    prefixed = [n for n in rows if n in prefix_names(bare)]
    if prefixed:
        raise PeftliteError(f"adapter_per_row: {prefixed[0]!r} is a prefix, which applies to the whole batch; "
                            "per-row batches take LoRA and bottleneck adapters.")
    refuse_merged(bare, "adapter_per_row", layers=layers)
    refuse_sequence_first(bare, [*layers, *wrappers])
    chosen = list(dict.fromkeys(n for n in rows if n is not None))
    index = torch.tensor([-1 if n is None else chosen.index(n) for n in rows])  # [B]
    flags = adapter_flags(layers, wrappers)
    shared = {}  # layers holding the same adapters share one mask (each its own cache)
    for layer in layers.values():
        key = (tuple((n, s.rank, s.dropout) for n, s in layer.lora_settings.items()), layer.weight.device)
        if key not in shared:
            shared[key] = lora_rows(layer, chosen, index)
        layer.lora_rows = dataclasses.replace(shared[key], cache={})
    for adapter in wrappers.values():
        adapter.adapter_rows = bottleneck_rows(adapter, chosen, index)
    if torch.is_grad_enabled():  # a training batch: only its adapters train (serving changes no flag)
        train_only(bare, chosen, layers, wrappers)
    check = bare.register_forward_pre_hook(BatchCheck(len(rows)), with_kwargs=True)
    try:
        with entered(bare, "adapter_per_row"):
            yield model
    finally:
        check.remove()
        for layer in layers.values():
            layer.lora_rows = None
        for adapter in wrappers.values():
            adapter.adapter_rows = None
        for param, flag in flags:
            param.requires_grad_(flag)


def refuse_sequence_first(model: nn.Module, adapted: list[str]) -> None:
    """Raise if an adapted module is inside, or wraps, a module that takes sequence-first inputs
    (``batch_first=False``): its layers see [T, B, ...], so rows would be read as positions."""
    for path, module in model.named_modules():
        layer = isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer))  # keeps it on self_attn
        if getattr(module.self_attn if layer else module, "batch_first", None) is False:
            near = next((a for a in adapted if a == path or a.startswith(f"{path}.") or not a
                         or path.startswith(f"{a}.") or not path), None)
            if near is not None:
                raise PeftliteError(f"adapter_per_row: '{path or type(module).__name__}' ({type(module).__name__}) "
                                    f"takes sequence-first inputs (batch_first=False), so the adapted '{near}' does "
                                    "not see the rows of the batch on its leading axis; rows would be mixed. Build "
                                    "it with batch_first=True to choose adapters per row.")


class BatchCheck:
    """A forward pre-hook on the model while ``adapter_per_row`` is entered: the batch must have one row per
    name. A layer seeing [B*T, d] cannot tell 4 rows from 2 rows of 2 tokens; the model's input can. Eager
    only: under torch.compile the layers' own shape checks stand (a hook traced into a graph would keep the
    first batch's row count)."""

    def __init__(self, rows: int):
        self.rows = rows

    def __call__(self, module, args, kwargs):
        if torch.compiler.is_compiling():
            return None
        batched = [v for v in kwargs.values() if isinstance(v, torch.Tensor) and v.ndim >= 2]  # not cache_position
        candidates = [*args, kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *batched]
        first = next((t for t in candidates if isinstance(t, torch.Tensor) and t.ndim >= 1), None)
        if first is not None and first.shape[0] != self.rows:
            raise PeftliteError(f"adapter_per_row: {self.rows} names (one per row) for a batch of {first.shape[0]} "
                                f"rows (input shape {tuple(first.shape)}); pass exactly one name (or None) per row.")
        return None


def lora_rows(layer: LoRALayer, chosen: list[str], index: torch.Tensor) -> RowMix:
    """The layer's stacked columns and which row uses which.

    Every adapter of the layer takes part (columns of adapters no row uses are masked), so a layer's
    shapes do not depend on the batch's assignment and a compiled model does not recompile from one
    batch to the next; a layer none of whose adapters any row uses adds nothing (``names`` empty).
    """
    settings = layer.lora_settings
    names = tuple(settings) if any(n in chosen for n in settings) else ()
    device = layer.weight.device
    owner = [chosen.index(n) if n in chosen else -2 for n in names]  # -2: no row (None rows are -1)
    owners = torch.tensor([o for o, n in zip(owner, names) for _ in range(settings[n].rank)], dtype=torch.long)
    mask = (index[:, None] == owners[None, :]).to(device)  # [B, R]
    probability = torch.tensor([0.0] + [settings[n].dropout if n in names else 0.0 for n in chosen])
    dropout = probability[index + 1].to(device) if bool(probability.any()) else None  # [B]
    slots = torch.tensor([names.index(n) if n in names else len(names) for n in chosen] + [len(names)])
    return RowMix(names, mask, slots[index].to(device), dropout)  # index -1 (None) picks the last: no adapter


def bottleneck_rows(adapter: Adapter, chosen: list[str], index: torch.Tensor) -> RowMix:
    """As :func:`lora_rows`, one column per bottleneck."""
    names = tuple(adapter.adapter) if any(n in chosen for n in adapter.adapter) else ()
    owners = torch.tensor([chosen.index(n) if n in chosen else -2 for n in names], dtype=torch.long)
    device = next(adapter.adapter.parameters()).device
    mask = (index[:, None] == owners[None, :]).to(device)
    slot = torch.full(index.shape, len(names), device=device)  # unused by bottlenecks, kept for one RowMix
    return RowMix(names, mask, slot, None)  # dropout: each bottleneck's own


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter ``name`` from every layer, in place, leaving no trace in the state dict; return ``model``.

    A layer left without adapters gets its original class back (a bottleneck wrapper its base
    module). Refused while the adapter is merged (``unmerge`` first).
    """
    bare = unwrap(model)
    refuse_in_context(bare, "delete_adapter")
    require_adapters(bare, "delete_adapter")
    if not isinstance(name, str):
        raise PeftliteError(f"delete_adapter: name={name!r}: expected one adapter name; this model's adapters are "
                            f"{adapter_names(bare)}.")
    check_names(bare, [name], "delete_adapter")
    refuse_merged(bare, "delete_adapter", [name])
    for layer in lora_layers(bare).values():
        if name in layer.lora_settings:
            remove_lora(layer, name)
    emptied = {}
    for path, adapter in adapter_modules(bare).items():
        if name in adapter.adapter:
            adapter.remove(name)
            if not len(adapter.adapter):
                emptied[path] = adapter
    plain = {path: adapter.release() for path, adapter in emptied.items()}
    if "" in plain:
        raise PeftliteError("delete_adapter: the model is itself an Adapter; use peftlite.unload(model).")
    replace(bare, plain)
    if name in prefix_names(bare):
        prefix_attach.remove_prefix(bare)
    if not adapter_names(bare):
        for module in bare.modules():
            module.__dict__.pop(TRAINED, None)
        events.released(bare)
    sync_fast_path_guards(bare, is_adapted)
    return model


@dataclass(frozen=True)
class Summary:
    """Parameter counts: ``total`` (base and adapters), ``trainable`` (requires_grad), per adapter name,
    and trained heads. ``str()`` prints the table (what PEFT's ``print_trainable_parameters`` shows, split)."""

    total: int
    trainable: int
    adapters: dict
    active: tuple
    heads: int

    def __str__(self) -> str:
        lines = [f"{'adapter':<24}{'parameters':>14}  active"]
        for name, count in self.adapters.items():
            lines.append(f"{name:<24}{count:>14,}  {'yes' if name in self.active else 'no'}")
        if self.heads:
            lines.append(f"{'(trained heads)':<24}{self.heads:>14,}  yes")
        share = 100 * self.trainable / self.total if self.total else 0.0
        lines.append(f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
                     f"trainable%: {share:.4f}")
        return "\n".join(lines)


def summary(model: nn.Module) -> Summary:
    """Trainable vs total parameters, per adapter and in all: ``print(peftlite.summary(model))``."""
    bare = unwrap(model)
    counts = dict.fromkeys(adapter_names(bare), 0)
    for layer in lora_layers(bare).values():
        for n in layer.lora_settings:
            counts[n] += layer.lora_A[n].numel() + layer.lora_B[n].numel()
    for adapter in adapter_modules(bare).values():
        for n, bottleneck in adapter.adapter.items():
            counts[n] += sum(p.numel() for p in bottleneck.parameters())
    for n in prefix_names(bare):
        counts[n] += sum(p.numel() for p in bare._modules[prefix_attach.SLOT][n].parameters())
    heads = sum(p.numel() for m in bare.modules() if m.__dict__.get(TRAINED) for p in m.parameters())
    unique = {id(p): p for p in bare.parameters()}.values()
    return Summary(total=sum(p.numel() for p in unique), trainable=sum(p.numel() for p in unique if p.requires_grad),
                   adapters=counts, active=tuple(active_adapters(bare)), heads=heads)
