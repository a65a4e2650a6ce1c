"""The Hugging Face PEFT on-disk format for LoRA: key names and ``adapter_config.json``.

Weights (``adapter_model.safetensors``): ``base_model.model.<module path>.lora_A.weight`` [r, in]
and ``.lora_B.weight`` [out, r]. The config holds one ``r``/``lora_alpha`` plus
``rank_pattern``/``alpha_pattern`` for layers that differ; a pattern key ``k`` applies to a
module whose name matches the regex ``(.*\\.)?(k)$``.
"""

import re
from collections import Counter

import torch
from torch import nn

from .errors import PeftliteError
from .lora import LoRALinear, check_lora_options
from .targets import name_matches, output_heads

PREFIX = "base_model.model."
KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight")

# Config fields whose non-empty value changes what the adapter computes in ways peftlite does not implement.
UNSUPPORTED = ("use_dora", "fan_in_fan_out", "layers_to_transform", "layer_replication",
               "lora_bias", "target_parameters", "trainable_token_indices", "use_qalora", "use_bdlora",
               "alora_invocation_tokens", "arrow_config", "kasa_config", "monteclora_config", "velora_config")
# Initialisations that also rewrite the base weights, so the adapter alone does not reproduce the model.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def weight_key(module: str, part: str) -> str:
    return f"{PREFIX}{module}.{part}.weight"


def adapter_tensors(layers: dict[str, LoRALinear]) -> dict:
    """The safetensors payload: two contiguous CPU tensors per layer."""
    tensors = {}
    for name, layer in layers.items():
        tensors[weight_key(name, "lora_A")] = layer.lora_A.detach().to("cpu").contiguous()
        tensors[weight_key(name, "lora_B")] = layer.lora_B.detach().to("cpu").contiguous()
    return tensors


def trained_modules(model: nn.Module, adapter: set[int]) -> dict[str, nn.Module]:
    """Modules with trainable parameters of their own besides adapters (an unfrozen head, a norm).

    ``adapter``: ids of the parameters that belong to peftlite modules (LoRA, adapters, prefix).
    They are saved whole, as PEFT's ``modules_to_save``; their state-dict entries go in the file.
    """
    found = {}
    for name, module in model.named_modules():
        if not any(p.requires_grad and id(p) not in adapter for p in module.parameters(recurse=False)):
            continue
        if isinstance(module, LoRALinear):
            raise PeftliteError(f"the base weight or bias of LoRA layer '{name}' is trainable; the PEFT format cannot "
                                f"hold it. Freeze it (model.get_submodule('{name}').weight.requires_grad_(False)).")
        if not name or any(next(child.parameters(), None) is not None for child in module.children()):
            raise PeftliteError(f"module '{name or type(module).__name__}' has trainable parameters of its own and "
                                "submodules with parameters; the PEFT format saves whole leaf modules only "
                                "(e.g. a head or a norm). Freeze its own parameters or train a leaf module instead.")
        found[name] = module
    return found


def module_tensors(modules: dict[str, nn.Module]) -> dict:
    """``base_model.model.<module>.<key>`` for every state-dict entry of the given whole modules."""
    return {f"{PREFIX}{name}.{key}": tensor.detach().to("cpu").contiguous()
            for name, module in modules.items() for key, tensor in module.state_dict().items()}


def saved_module_slots(model: nn.Module, config: dict) -> dict[str, torch.Tensor]:
    """Where the file's ``modules_to_save`` entries go: ``{file key: the model's tensor}``."""
    wanted = config.get("modules_to_save") or []
    slots = {}
    for name, module in model.named_modules():
        if name and any(name_matches(entry, name) for entry in wanted):
            if isinstance(module, LoRALinear):
                raise PeftliteError(f"module '{name}' is listed in modules_to_save and also has LoRA; "
                                    "call peftlite.unload(model, merge=False) first.")
            slots.update({f"{PREFIX}{name}.{key}": tensor
                          for key, tensor in module.state_dict(keep_vars=True).items()})
    return slots


def build_config(model: nn.Module, layers: dict[str, LoRALinear], saved_modules=()) -> dict:
    """``adapter_config.json`` for the model's LoRA layers (and whole saved modules), for PEFT's ``LoraConfig``."""
    rslora = single_value("use_rslora", {n: layer.rslora for n, layer in layers.items()})
    dropout = single_value("lora_dropout", {n: layer.dropout for n, layer in layers.items()})
    r, rank_pattern = common_and_pattern({n: layer.rank for n, layer in layers.items()})
    alpha, alpha_pattern = common_and_pattern({n: layer.alpha for n, layer in layers.items()})
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": name_or_path,
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "use_rslora": rslora,
        "target_modules": target_list(model, set(layers)),
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "bias": "none", "fan_in_fan_out": False, "use_dora": False, "init_lora_weights": True,
        "modules_to_save": sorted(saved_modules) or None, "exclude_modules": None,
        "layers_to_transform": None, "layers_pattern": None, "inference_mode": True,
    }


def single_value(field: str, values: dict):
    distinct = set(values.values())
    if len(distinct) > 1:
        raise PeftliteError(f"the PEFT format holds one {field} for all layers, but this model's LoRA layers use "
                            f"{sorted(distinct)}. Re-inject with one {field} to save in this format.")
    return distinct.pop()


def common_and_pattern(values: dict[str, float]) -> tuple:
    """The most common value, and ``{escaped module name: value}`` for the layers that differ."""
    common = Counter(values.values()).most_common(1)[0][0]
    pattern = {re.escape(name): value for name, value in values.items() if value != common}
    return (int(common) if float(common).is_integer() else common), pattern


def target_list(model: nn.Module, adapted: set[str]) -> list[str]:
    """Short names (``["q_proj", "v_proj"]``) if they select exactly the adapted modules, else full names."""
    short = sorted({name.rsplit(".", 1)[-1] for name in adapted})
    selected = {name for name, _ in model.named_modules() if any(name_matches(s, name) for s in short)}
    return short if selected == adapted else sorted(adapted)


def check_config(config, source: str) -> None:
    """Raise unless ``config`` describes a plain LoRA adapter on Linear layers."""
    if not isinstance(config, dict):
        raise PeftliteError(f"{source}: expected a JSON object, got {type(config).__name__}.")
    if config.get("peft_type") != "LORA":
        raise PeftliteError(f"{source}: peft_type is {config.get('peft_type')!r}; peftlite loads 'LORA', "
                            "'PREFIX_TUNING' and 'BOTTLENECK_ADAPTER' adapters.")
    used = [field for field in UNSUPPORTED if config.get(field)]
    if used:
        raise PeftliteError(f"{source}: uses {', '.join(used)}, which peftlite does not support; "
                            "only plain LoRA on nn.Linear layers can be loaded.")
    if config.get("bias", "none") != "none":
        raise PeftliteError(f"{source}: bias={config['bias']!r} trains base biases too; only bias='none' is supported.")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.startswith(BASE_CHANGING_INITS):
        raise PeftliteError(f"{source}: init_lora_weights={init!r} also rewrites the base weights, so this adapter "
                            "does not apply to the original model. Convert it to plain LoRA with PEFT first.")
    try:
        check_lora_options(config.get("r", 8), config.get("lora_alpha", 8), config.get("lora_dropout", 0.0), "default")
    except PeftliteError as err:
        raise PeftliteError(f"{source}: {err}") from None


def layer_settings(config: dict, module: str) -> tuple[int, float]:
    """(rank, alpha) the config gives ``module``, honouring ``rank_pattern``/``alpha_pattern``."""
    return (pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8)),
            float(pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))))


def pattern_value(patterns: dict, module: str, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def configured_targets(model: nn.Module, config: dict) -> set[str]:
    """Linear (or LoRA) modules that the config's ``target_modules``/``exclude_modules`` select, as PEFT would."""
    targets, exclude = config.get("target_modules"), config.get("exclude_modules")
    heads = output_heads(model)
    found = set()
    for name, module in model.named_modules():
        if not name or not isinstance(module, (nn.Linear, LoRALinear)) or spec_selects(exclude, name):
            continue
        if targets == "all-linear" and name not in heads or targets != "all-linear" and spec_selects(targets, name):
            found.add(name)
    return found


def spec_selects(spec, name: str) -> bool:
    if not spec:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name_matches(entry, name) for entry in spec)

