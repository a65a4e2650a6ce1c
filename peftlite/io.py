"""save_adapter / load_adapter: adapters in the Hugging Face PEFT format (safetensors + JSON).

LoRA (``peft_type: LORA``) and prefix tuning (``PREFIX_TUNING``) are read and written as PEFT
does; bottleneck adapters, which PEFT lacks, as ``BOTTLENECK_ADAPTER`` (see ``adapter_format``).

Nothing here unpickles: weights are read with safetensors and the config with ``json``.
Loading is strict: a missing or unexpected key, a shape that does not fit, an unreadable file
or an unsupported config raises :class:`PeftliteError` and leaves the model unchanged.
"""

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from . import adapter_format, prefix_format, prefix_tuning
from . import peft_format as fmt
from .errors import PeftliteError
from .inject import (adapter_modules, adapter_parameters, freeze_all_but_adapters, is_adapted, lora_layers, replace,
                     require_lora)
from .fast_path import sync_fast_path_guards
from .lora import LoRALinear, lora_scaling
from .safetensors_file import save_file

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def save_adapter(model: nn.Module, directory, method: str | None = None) -> Path:
    """Write the model's adapter weights and config to ``directory`` (created if needed); return it.

    Files: ``adapter_model.safetensors`` and ``adapter_config.json``. LoRA and prefix tuning are
    loadable by ``peft.PeftModel.from_pretrained(base_model, directory)`` and by
    :func:`load_adapter`; bottleneck adapters by :func:`load_adapter`. One method per
    directory, as in PEFT: a model with several needs ``method="lora" | "adapter" | "prefix"``.
    LoRA is saved as trained, whether or not it is merged; leaf modules whose own parameters
    were made trainable (an unfrozen head, say) are saved whole, as PEFT's ``modules_to_save``.
    A reparameterized prefix is saved as the table it produces.
    """
    present = present_methods(model)
    if not present:
        require_lora(model, "save_adapter")
    if method is None and len(present) > 1:
        raise PeftliteError(f"the model has {' and '.join(present)}; a directory holds one method, as in PEFT. Save "
                            "each in its own directory: save_adapter(model, 'out/lora', method='lora'), ...")
    method = present[0] if method is None else method
    if method not in present:
        raise PeftliteError(f"method={method!r}: the model has no such adapter; it has {', '.join(present)}.")
    if method == "lora":
        tensors, config = lora_payload(model)
    else:
        tensors, config = (adapter_format if method == "adapter" else prefix_format).payload(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


def present_methods(model: nn.Module) -> list[str]:
    found = {"lora": bool(lora_layers(model)), "adapter": bool(adapter_modules(model)),
             "prefix": prefix_tuning.prefix_encoder(model) is not None}
    return [method for method, here in found.items() if here]


def lora_payload(model: nn.Module) -> tuple[dict, dict]:
    layers = lora_layers(model)
    if "" in layers:
        raise PeftliteError("save_adapter needs the model that contains the LoRALinear, not the layer itself.")
    whole = fmt.trained_modules(model, adapter_parameters(model))
    return {**fmt.adapter_tensors(layers), **fmt.module_tensors(whole)}, fmt.build_config(model, layers, whole)


def load_adapter(model: nn.Module, directory) -> nn.Module:
    """Load an adapter saved by :func:`save_adapter` or by PEFT (LoRA, prefix tuning) into ``model``, in place.

    LoRA: layers without LoRA yet are wrapped in :class:`LoRALinear` with the rank, alpha,
    rslora and dropout of the file; existing LoRA layers must have the file's rank and get its
    values. Modules in the config's ``modules_to_save`` get the file's values and stay
    trainable. Prefix tuning: the model gets ``model.prefix_encoder`` (or, if it has one of the
    same shape, new values). Bottleneck adapters: the named modules are wrapped (or refilled).
    Every other parameter is frozen, as by ``inject``. Returns ``model``.
    """
    directory = Path(directory)
    config = read_config(directory / CONFIG_NAME)
    tensors = read_weights(directory)
    source = directory / WEIGHTS_NAME
    kind = config.get("peft_type")
    if kind in ("PREFIX_TUNING", adapter_format.PEFT_TYPE):
        (prefix_format if kind == "PREFIX_TUNING" else adapter_format).load(model, config, tensors, source)
        freeze_all_but_adapters(model)
    else:
        fmt.check_config(config, str(directory / CONFIG_NAME))
        load_lora(model, config, tensors, source)
    sync_fast_path_guards(model, is_adapted)
    return model


def load_lora(model: nn.Module, config: dict, tensors: dict, source: Path) -> None:
    pairs, whole = split_keys(tensors, source)
    settings = {name: check_layer(model, name, a, b, config) for name, (a, b) in pairs.items()}
    check_complete(model, config, set(pairs), source)
    slots = check_saved_modules(model, config, whole, set(pairs), source)
    apply(model, config, pairs, settings)
    load_saved_modules(whole, slots)


def read_config(path: Path) -> dict:
    if not path.is_file():
        raise PeftliteError(f"{path}: no such file. Point load_adapter at a directory written by save_adapter "
                            "or PEFT's save_pretrained.")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PeftliteError(f"{path}: not readable JSON ({err}).") from None
    if not isinstance(config, dict):
        raise PeftliteError(f"{path}: expected a JSON object, got {type(config).__name__}.")
    return config


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        pickled = ""
        if (directory / "adapter_model.bin").exists():
            pickled = " adapter_model.bin is a pickle, which peftlite never loads."
        raise PeftliteError(f"{path}: no such file.{pickled} Save the adapter with safetensors "
                            "(PEFT: save_pretrained(..., safe_serialization=True)).")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise PeftliteError(f"{path}: not a readable safetensors file ({err}).") from None


def split_keys(tensors: dict, source: Path) -> tuple[dict, dict]:
    """``({module path: (lora_A, lora_B)}, {other key: tensor})``; raises on a LoRA key without its pair."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    others = {}
    for key, tensor in tensors.items():
        match = fmt.KEY.fullmatch(key)
        if match is None:
            others[key] = tensor
            continue
        parts.setdefault(match["module"], {})[match["part"]] = tensor
    for module, pair in parts.items():
        for part in ("lora_A", "lora_B"):
            if part not in pair:
                raise PeftliteError(f"{source}: missing key '{fmt.weight_key(module, part)}'.")
    if not parts:
        raise PeftliteError(f"{source}: holds no LoRA weights.")
    return {module: (pair["lora_A"], pair["lora_B"]) for module, pair in parts.items()}, others


def check_saved_modules(model: nn.Module, config: dict, whole: dict, lora: set[str], source: Path) -> dict:
    """Non-LoRA keys must be exactly the state of the config's ``modules_to_save`` modules."""
    slots = fmt.saved_module_slots(model, config)
    both = sorted(m for m in lora if any(key.startswith(f"{fmt.PREFIX}{m}.") for key in slots))
    if both:
        raise PeftliteError(f"{source}: module '{both[0]}' has LoRA weights and is also in modules_to_save.")
    for key, tensor in whole.items():
        if key not in slots:
            raise PeftliteError(f"{source}: unexpected key '{key}'; expected 'base_model.model.<module>.lora_A.weight'"
                                " and '.lora_B.weight' keys, or the state of a module listed in modules_to_save.")
        if tuple(tensor.shape) != tuple(slots[key].shape):
            raise PeftliteError(f"shape mismatch for '{key}': file has {tuple(tensor.shape)}, the model "
                                f"{tuple(slots[key].shape)}.")
    missing = sorted(set(slots) - set(whole))
    if missing:
        raise PeftliteError(f"{source}: missing key '{missing[0]}' (its module is in modules_to_save).")
    return slots


def load_saved_modules(whole: dict, slots: dict) -> None:
    """Copy whole-module values in; their parameters stay trainable, as PEFT's modules_to_save."""
    with torch.no_grad():
        for key, tensor in whole.items():
            slots[key].copy_(tensor)
            if isinstance(slots[key], nn.Parameter):
                slots[key].requires_grad_(True)


def check_layer(model: nn.Module, name: str, a: torch.Tensor, b: torch.Tensor, config: dict) -> tuple[int, float]:
    """Check one layer's tensors against the model and config; return its (rank, alpha)."""
    key = fmt.weight_key(name, "lora_A")
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise PeftliteError(f"unexpected key '{key}': the model has no module '{name}'. "
                            "Is this adapter for another model?") from None
    if not isinstance(module, (nn.Linear, LoRALinear)):
        raise PeftliteError(f"key '{key}': module '{name}' is a {type(module).__name__}, not an nn.Linear.")
    rank, alpha = fmt.layer_settings(config, name)
    expected_a, expected_b = (rank, module.in_features), (module.out_features, rank)
    if tuple(a.shape) != expected_a or tuple(b.shape) != expected_b:
        raise PeftliteError(f"shape mismatch for '{name}': file has lora_A {tuple(a.shape)} and lora_B "
                            f"{tuple(b.shape)}, the model and config (r={rank}) need {expected_a} and {expected_b}.")
    if not (a.is_floating_point() and b.is_floating_point()):
        raise PeftliteError(f"key '{key}': dtype {a.dtype}/{b.dtype}, expected floating-point weights.")
    if isinstance(module, LoRALinear) and module.rank != rank:
        raise PeftliteError(f"'{name}' already has LoRA of rank {module.rank}, the file has rank {rank}. "
                            "Call peftlite.unload(model, merge=False) first to load a different adapter.")
    if isinstance(module, LoRALinear) and module.merged:
        raise PeftliteError(f"'{name}' is merged; call peftlite.unmerge(model) before loading new adapter weights.")
    return rank, alpha


def check_complete(model: nn.Module, config: dict, present: set[str], source: Path) -> None:
    """Every layer the config targets, and every LoRA layer the model has, must be in the file."""
    wanted = fmt.configured_targets(model, config) | set(lora_layers(model))
    missing = sorted(wanted - present)
    if missing:
        shown = ", ".join(f"'{fmt.weight_key(m, 'lora_A')}'" for m in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise PeftliteError(f"{source}: missing key {shown}{more} (targeted by the config or already LoRA "
                            "in the model).")


def apply(model: nn.Module, config: dict, pairs: dict, settings: dict) -> None:
    """Mutate: wrap the layers that need it, then copy the weights in. Nothing here can fail on user input."""
    rslora, dropout = bool(config.get("use_rslora", False)), float(config.get("lora_dropout", 0.0))
    new = {}
    for name, (rank, alpha) in settings.items():
        module = model.get_submodule(name)
        if isinstance(module, nn.Linear):
            new[name] = LoRALinear(module, rank, alpha=alpha, dropout=dropout, rslora=rslora)
    replace(model, new)
    for name, (a, b) in pairs.items():
        layer = model.get_submodule(name)
        rank, alpha = settings[name]
        layer.alpha, layer.rslora, layer.dropout = alpha, rslora, dropout
        layer.scaling = lora_scaling(rank, alpha, rslora)
        with torch.no_grad():
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)
    freeze_all_but_adapters(model)
