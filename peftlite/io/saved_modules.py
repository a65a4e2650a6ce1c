"""Modules saved whole beside an adapter, as PEFT's ``modules_to_save``: trained heads and hand-unfrozen leaves.

Every format writes them: their state-dict entries under ``<prefix><module>.<key>`` and their names in the
config's ``modules_to_save``. The prefix is ``base_model.model.`` for LoRA (and our bottleneck format) and
``base_model.`` for prefix tuning, as PEFT writes each. Loading checks every key and shape first
(:func:`plan`), then copies the values in and marks the modules as trained heads (:func:`apply`).
"""

import torch
from torch import nn

from ..errors import PeftliteError
from ..lora import LoRALayer
from ..model import TRAINED, adapter_parameters, marked_heads
from ..sharding import whole
from ..targets import name_matches


def trained_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules to save whole: trained heads (``inject(trainable=...)``) and leaf modules whose own
    parameters were made trainable by hand (an unfrozen norm)."""
    heads = marked_heads(model)
    found = {name: model.get_submodule(name) for name in heads}
    adapter = adapter_parameters(model)
    for name, module in model.named_modules():
        if name in heads or any(name.startswith(head + ".") for head in heads):
            continue
        if not any(p.requires_grad and id(p) not in adapter for p in module.parameters(recurse=False)):
            continue
        if isinstance(module, LoRALayer):
            raise PeftliteError(f"the base weight or bias of LoRA layer '{name}' is trainable; the PEFT format cannot "
                                f"hold it. Freeze it (model.get_submodule('{name}').weight.requires_grad_(False)).")
        if not name or any(next(child.parameters(), None) is not None for child in module.children()):
            raise PeftliteError(f"module '{name or type(module).__name__}' has trainable parameters of its own and "
                                "submodules with parameters; name it in inject(trainable=[...]) to save it whole, or "
                                "freeze its own parameters.")
        found[name] = module
    return found


def tensors(modules: dict[str, nn.Module], prefix: str) -> dict:
    """``<prefix><module>.<key>`` for every state-dict entry of the given whole modules."""
    return {f"{prefix}{name}.{key}": whole(tensor).to("cpu").contiguous()
            for name, module in modules.items() for key, tensor in module.state_dict(keep_vars=True).items()}


def config_entries(config: dict, source: str) -> list[str]:
    """The config's ``modules_to_save`` entries (module names, exact or dotted suffix), checked."""
    wanted = config.get("modules_to_save") or []
    if not isinstance(wanted, list) or not all(isinstance(entry, str) for entry in wanted):
        raise PeftliteError(f"{source}: modules_to_save={wanted!r}: expected a list of module names (or null).")
    return wanted


def is_listed(entries: list[str], path: str) -> bool:
    """Whether module ``path`` is, or is inside, a module that ``modules_to_save`` ``entries`` name."""
    parts = path.split(".")
    return any(name_matches(e, ".".join(parts[:i])) for e in entries for i in range(1, len(parts) + 1))


def listed(model: nn.Module, config: dict, source: str) -> set[str]:
    """The modules the config's ``modules_to_save`` names (exact or dotted suffix), outermost only."""
    wanted = config_entries(config, source)
    heads = {path for path, _ in model.named_modules() if path and any(name_matches(e, path) for e in wanted)}
    for path in sorted(heads):
        if any(isinstance(m, LoRALayer) for m in model.get_submodule(path).modules()):
            raise PeftliteError(f"{source}: module '{path}' is listed in modules_to_save and holds LoRA; call "
                                "peftlite.unload(model, merge=False) first.")
    return {path for path in heads if not any(path.startswith(other + ".") for other in heads)}


def split(tensors_in: dict, heads: set[str], prefix: str) -> tuple[dict, dict]:
    """``(the heads' tensors, the rest)``."""
    mine = {key: t for key, t in tensors_in.items()
            if any(key.startswith(f"{prefix}{head}.") for head in heads)}
    return mine, {key: t for key, t in tensors_in.items() if key not in mine}


def plan(model: nn.Module, heads: set[str], whole: dict, source: str, prefix: str) -> dict:
    """``{key: (the model's tensor, the file's)}``; the keys must be exactly the heads' state, in its shapes."""
    slots = {f"{prefix}{path}.{key}": tensor for path in sorted(heads)
             for key, tensor in model.get_submodule(path).state_dict(keep_vars=True).items()}
    for key, tensor in whole.items():
        if key not in slots:
            raise PeftliteError(f"{source}: unexpected key '{key}'; expected the adapter's keys or the state of a "
                                "module listed in modules_to_save.")
        if tuple(tensor.shape) != tuple(slots[key].shape):
            raise PeftliteError(f"{source}: shape mismatch for '{key}': file has {tuple(tensor.shape)}, the model "
                                f"{tuple(slots[key].shape)}.")
        if tensor.is_floating_point() != slots[key].is_floating_point():
            raise PeftliteError(f"{source}: '{key}' has dtype {tensor.dtype}, the model's {slots[key].dtype}.")
    missing = sorted(set(slots) - set(whole))
    if missing:
        raise PeftliteError(f"{source}: missing key '{missing[0]}' (its module is in modules_to_save).")
    return {key: (slots[key], tensor) for key, tensor in whole.items()}


def apply(model: nn.Module, values: dict, heads: set[str]) -> None:
    """Mutate: copy the planned values in; the modules train from now on, as trained heads."""
    with torch.no_grad():
        for slot, value in values.values():
            slot.copy_(value)
    for path in heads:
        model.get_submodule(path).__dict__[TRAINED] = True
