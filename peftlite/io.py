"""save_adapter / load_adapter: LoRA weights in the Hugging Face PEFT format (safetensors + JSON).

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

from . import peft_format as fmt
from .errors import PeftliteError
from .inject import freeze_all_but_lora, lora_layers, replace, require_lora
from .lora import LoRALinear, lora_scaling
from .safetensors_file import save_file

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def save_adapter(model: nn.Module, directory) -> Path:
    """Write the model's LoRA weights and config to ``directory`` (created if needed); return it.

    Files: ``adapter_model.safetensors`` and ``adapter_config.json``, loadable by
    ``peft.PeftModel.from_pretrained(base_model, directory)`` and by :func:`load_adapter`.
    Saves the adapter as trained, whether or not it is merged.
    """
    layers = require_lora(model, "save_adapter")
    if "" in layers:
        raise PeftliteError("save_adapter needs the model that contains the LoRALinear, not the layer itself.")
    config = fmt.build_config(model, layers)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(fmt.adapter_tensors(layers), directory / WEIGHTS_NAME, metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


def load_adapter(model: nn.Module, directory) -> nn.Module:
    """Load a LoRA adapter saved by :func:`save_adapter` or by PEFT into ``model``, in place.

    Layers without LoRA yet are wrapped in :class:`LoRALinear` with the rank, alpha, rslora and
    dropout of the file; existing LoRA layers must have the file's rank and get its values.
    Every other parameter is frozen, as by ``inject``. Returns ``model``.
    """
    directory = Path(directory)
    config = read_config(directory / CONFIG_NAME)
    tensors = read_weights(directory)
    pairs = group_keys(tensors, directory / WEIGHTS_NAME)
    settings = {name: check_layer(model, name, a, b, config) for name, (a, b) in pairs.items()}
    check_complete(model, config, set(pairs), directory / WEIGHTS_NAME)
    apply(model, config, pairs, settings)
    return model


def read_config(path: Path) -> dict:
    if not path.is_file():
        raise PeftliteError(f"{path}: no such file. Point load_adapter at a directory written by save_adapter "
                            "or PEFT's save_pretrained.")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PeftliteError(f"{path}: not readable JSON ({err}).") from None
    fmt.check_config(config, str(path))
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


def group_keys(tensors: dict, source: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module path: (lora_A, lora_B)}``; raises on a key that is not LoRA or lacks its pair."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = fmt.KEY.fullmatch(key)
        if match is None:
            raise PeftliteError(f"{source}: unexpected key '{key}'; expected only "
                                "'base_model.model.<module>.lora_A.weight' and '.lora_B.weight' keys.")
        parts.setdefault(match["module"], {})[match["part"]] = tensor
    for module, pair in parts.items():
        for part in ("lora_A", "lora_B"):
            if part not in pair:
                raise PeftliteError(f"{source}: missing key '{fmt.weight_key(module, part)}'.")
    if not parts:
        raise PeftliteError(f"{source}: holds no LoRA weights.")
    return {module: (pair["lora_A"], pair["lora_B"]) for module, pair in parts.items()}


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
    freeze_all_but_lora(model)
