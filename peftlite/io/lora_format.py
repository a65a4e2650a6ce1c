"""LoRA in the Hugging Face PEFT on-disk format: key names, ``adapter_config.json``, and loading as one plan.

Weights (``adapter_model.safetensors``), adapter names stripped as PEFT writes them:
``base_model.model.<path>.lora_A.weight`` and ``.lora_B.weight`` (Linear, Conv1D, conv), or
``.lora_embedding_A`` / ``.lora_embedding_B`` (Embedding), shaped as the layer kind says
(``kinds.py``). The config holds one ``r``/``lora_alpha`` plus ``rank_pattern``/``alpha_pattern``
for layers that differ (a pattern key ``k`` applies to a module whose name matches the regex
``(.*\\.)?(k)$``), and ``fan_in_fan_out: true`` when the layers are transformers' ``Conv1D``.

Loading reads and checks the whole config, then plans every layer against the model with the
same target and kind checks ``inject`` uses (:func:`plan_load`), and only then changes the model
(:func:`apply_load`). Every error names the file and, where there is one, the layer.
"""

import re
from collections import Counter
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..errors import MAX_SCALE, PeftliteError, finite_number
from ..kinds import CONV1D, KINDS, LINEAR_LIKE, kind_of
from ..lora import LoRALayer, LoRASettings, add_lora, check_lora_options, lora_layers, plan_lora
from ..sharding import assign, is_sharded, whole
from ..targets import check_lora_target, name_matches, output_heads, protected_modules

PREFIX = "base_model.model."
PARTS = sorted({part for kind in KINDS for part in kind.peft_keys}, key=len, reverse=True)
KEY = re.compile(rf"{re.escape(PREFIX)}(?P<module>.+)\.(?P<part>{'|'.join(map(re.escape, PARTS))})")

# Config fields whose non-empty value changes what the adapter computes in ways peftlite does not implement.
UNSUPPORTED = ("use_dora", "layers_to_transform", "layer_replication", "lora_bias", "target_parameters",
               "trainable_token_indices", "use_qalora", "use_bdlora", "alora_invocation_tokens", "arrow_config",
               "kasa_config", "monteclora_config", "velora_config")
# Initialisations that also rewrite the base weights, so the adapter alone does not reproduce the model.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def weight_key(module: str, part: str) -> str:
    return f"{PREFIX}{module}.{part}"


# ---- saving ----

def adapter_tensors(layers: dict[str, LoRALayer], name: str) -> dict:
    """The safetensors payload: A and B of adapter ``name`` per layer, contiguous on the CPU, PEFT's keys."""
    tensors = {}
    for path, layer in layers.items():
        key_a, key_b = layer.lora_kind.peft_keys
        tensors[weight_key(path, key_a)] = whole(layer.lora_A[name]).to("cpu").contiguous()
        tensors[weight_key(path, key_b)] = whole(layer.lora_B[name]).to("cpu").contiguous()
    return tensors


def build_config(model: nn.Module, layers: dict[str, LoRALayer], name: str) -> dict:
    """``adapter_config.json`` for adapter ``name`` of the model's LoRA layers, for PEFT's ``LoraConfig``."""
    settings = {path: layer.lora_settings[name] for path, layer in layers.items()}
    rslora = single_value("use_rslora", {n: s.rslora for n, s in settings.items()})
    dropout = single_value("lora_dropout", {n: s.dropout for n, s in settings.items()})
    r, rank_pattern = common_and_pattern({n: s.rank for n, s in settings.items()})
    alpha, alpha_pattern = common_and_pattern({n: s.alpha for n, s in settings.items()})
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": name_or_path,
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "use_rslora": rslora,
        "target_modules": target_list(model, set(layers)),
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "bias": "none", "fan_in_fan_out": any(layer.lora_kind is CONV1D for layer in layers.values()),
        "use_dora": False, "init_lora_weights": True,
        "modules_to_save": None, "exclude_modules": None,
        "layers_to_transform": None, "layers_pattern": None, "inference_mode": True,
    }


def single_value(name: str, values: dict):
    distinct = set(values.values())
    if len(distinct) > 1:
        raise PeftliteError(f"the PEFT format holds one {name} for all layers, but this model's LoRA layers use "
                            f"{sorted(distinct)}. Re-inject with one {name} to save in this format.")
    return distinct.pop()


def common_and_pattern(values: dict[str, float]) -> tuple:
    """The most common value, and ``{pattern key: value}`` for the layers that differ.

    PEFT (and :func:`pattern_value`) match a key as ``(.*\\.)?(key)$``, so a bare name ``fc`` would also
    match ``block.fc``: each key is the full module path, escaped and anchored with ``^``, which matches
    that module alone."""
    common = Counter(values.values()).most_common(1)[0][0]
    pattern = {f"^{re.escape(name)}": value for name, value in values.items() if value != common}
    return (int(common) if float(common).is_integer() else common), pattern


def target_list(model: nn.Module, adapted: set[str]) -> list[str]:
    """Short names (``["q_proj", "v_proj"]``) if they select exactly the adapted modules, else full names."""
    short = sorted({name.rsplit(".", 1)[-1] for name in adapted})
    selected = {name for name, _ in model.named_modules() if any(name_matches(s, name) for s in short)}
    return short if selected == adapted else sorted(adapted)


# ---- reading the config ----

def check_config(config, source: str) -> None:
    """Raise unless ``config`` describes plain LoRA that peftlite computes exactly as PEFT does."""
    if not isinstance(config, dict):
        raise PeftliteError(f"{source}: expected a JSON object, got {type(config).__name__}.")
    if config.get("peft_type") != "LORA":
        raise PeftliteError(f"{source}: peft_type is {config.get('peft_type')!r}; peftlite loads 'LORA', "
                            "'PREFIX_TUNING' and 'BOTTLENECK_ADAPTER' adapters.")
    used = [name for name in UNSUPPORTED if config.get(name)]
    if used:
        raise PeftliteError(f"{source}: uses {', '.join(used)}, which peftlite does not support; "
                            "only plain LoRA can be loaded.")
    if config.get("bias", "none") != "none":
        raise PeftliteError(f"{source}: bias={config['bias']!r} trains base biases too; only bias='none' is supported.")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.startswith(BASE_CHANGING_INITS):
        raise PeftliteError(f"{source}: init_lora_weights={init!r} also rewrites the base weights, so this adapter "
                            "does not apply to the original model. Convert it to plain LoRA with PEFT first.")
    try:
        check_lora_options(config.get("r", 8), config.get("lora_alpha", 8), config.get("lora_dropout", 0.0),
                           "default", config.get("use_rslora", False))
    except PeftliteError as err:
        raise PeftliteError(f"{source}: {err}") from None
    if not isinstance(config.get("fan_in_fan_out", False), bool):
        raise PeftliteError(f"{source}: fan_in_fan_out={config['fan_in_fan_out']!r}: expected true or false.")
    for name, check in (("rank_pattern", rank_ok), ("alpha_pattern", alpha_ok)):
        check_pattern(config.get(name), name, check, source)
    for name in ("target_modules", "exclude_modules", "modules_to_save"):
        check_names(config.get(name), name, source)


def rank_ok(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def alpha_ok(value) -> bool:
    return finite_number(value, MAX_SCALE) and value > 0


def check_pattern(patterns, name: str, ok, source: str) -> None:
    if patterns is None:
        return
    if not isinstance(patterns, dict):
        raise PeftliteError(f"{source}: {name} must be an object of pattern -> value, got {type(patterns).__name__}.")
    for key, value in patterns.items():
        try:
            re.compile(rf"(.*\.)?({key})$")
        except re.error as err:
            raise PeftliteError(f"{source}: {name} key {key!r} is not a valid regular expression ({err}).") from None
        if not ok(value):
            expected = "an integer >= 1" if name == "rank_pattern" else "a finite number > 0"
            raise PeftliteError(f"{source}: {name}[{key!r}] = {value!r}: expected {expected}.")


def check_names(value, name: str, source: str) -> None:
    """A module-name field: null, a list of names, or (targets and excludes) one regular expression."""
    if value is None:
        return
    if isinstance(value, str) and name != "modules_to_save":
        try:
            re.compile(value)
        except re.error as err:
            raise PeftliteError(f"{source}: {name} {value!r} is not a valid regular expression ({err}).") from None
        return
    if not isinstance(value, list) or not all(isinstance(entry, str) for entry in value):
        raise PeftliteError(f"{source}: {name}={value!r}: expected a list of module names (or null).")


def layer_settings(config: dict, module: str) -> LoRASettings:
    """The settings the config gives ``module``, honouring ``rank_pattern``/``alpha_pattern``."""
    rank = pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8))
    alpha = pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    return LoRASettings(rank, float(alpha), float(config.get("lora_dropout", 0.0)),
                        config.get("use_rslora", False))


def pattern_value(patterns: dict, module: str, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def configured_targets(model: nn.Module, config: dict) -> set[str]:
    """Modules of a supported kind that the config's ``target_modules``/``exclude_modules`` select, as PEFT would
    (``all-linear``: every Linear-like module but the output head)."""
    targets, exclude = config.get("target_modules"), config.get("exclude_modules")
    heads = output_heads(model)
    found = set()
    for name, module in model.named_modules():
        kind = kind_of(module)
        if not name or kind is None or spec_selects(exclude, name):
            continue
        if targets == "all-linear":
            if kind in LINEAR_LIKE and name not in heads:
                found.add(name)
        elif spec_selects(targets, name):
            found.add(name)
    return found


def spec_selects(spec, name: str) -> bool:
    if not spec:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name_matches(entry, name) for entry in spec)


# ---- loading: one plan, then one mutation ----

@dataclass
class LayerPlan:
    """One layer to load: new (``add`` holds :func:`add_lora`'s arguments) or an existing adapter to refill."""

    module: nn.Module
    settings: LoRASettings
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    add: tuple | None = None


@dataclass
class LoadPlan:
    name: str
    layers: dict[str, LayerPlan] = field(default_factory=dict)
    base: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # targets' own weights


def plan_load(model: nn.Module, config: dict, tensors: dict, source: str, name: str, heads: set[str]) -> LoadPlan:
    """Check the file's tensors (those of the ``modules_to_save`` heads taken out) against the model and the
    (already checked) config; change nothing."""
    pairs, others = split_keys(tensors, source)
    protected = protected_modules(model, heads)
    plan = LoadPlan(name)
    for path, (kind_key, a, b) in pairs.items():
        plan.layers[path] = plan_layer(model, path, kind_key, a, b, config, protected, source, name)
    drop_aliases(plan, source)
    check_fan_in_fan_out(config, plan, source)
    check_complete(model, config, set(pairs), name, source)
    check_hot_swap(plan, name, source)
    others, plan.base = base_layer_values(plan, others, source)
    if others:
        raise PeftliteError(f"{source}: unexpected key '{sorted(others)[0]}'; expected LoRA keys "
                            "('base_model.model.<module>.lora_A.weight', ...) or the state of a module listed in "
                            "modules_to_save.")
    return plan


def base_layer_values(plan: LoadPlan, whole: dict, source: str) -> tuple[dict, dict]:
    """PEFT's ``save_embedding_layers``: ``<target>.base_layer.weight`` holds a target's own weight (a resized
    vocabulary's new rows, say); PEFT loads it into the base layer, and so does peftlite. Returns the other
    keys and ``{key: (base parameter, value)}``."""
    base, rest = {}, {}
    for key, tensor in whole.items():
        path, _, parameter = key.removeprefix(PREFIX).rpartition(".base_layer.")
        layer = plan.layers.get(path)
        if layer is None or parameter not in ("weight", "bias") or getattr(layer.module, parameter, None) is None:
            rest[key] = tensor
            continue
        slot = getattr(layer.module, parameter)
        if tuple(tensor.shape) != tuple(slot.shape) or not tensor.is_floating_point():
            raise PeftliteError(f"{source}: '{key}' has shape {tuple(tensor.shape)} and dtype {tensor.dtype}; layer "
                                f"'{path}' needs floating-point {tuple(slot.shape)}.")
        base[key] = (slot, tensor)
    return rest, base


def split_keys(tensors: dict, source: str) -> tuple[dict, dict]:
    """``({path: (A's key suffix, A, B)}, {other key: tensor})``; raises on a LoRA key without its pair."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    others = {}
    for key, tensor in tensors.items():
        match = KEY.fullmatch(key)
        if match is None:
            others[key] = tensor
        else:
            parts.setdefault(match["module"], {})[match["part"]] = tensor
    pairs = {}
    for module, found in parts.items():
        kind_keys = next((k.peft_keys for k in KINDS if set(found) <= set(k.peft_keys)), None)
        if kind_keys is None:
            raise PeftliteError(f"{source}: layer '{module}' mixes key kinds {sorted(found)}; expected lora_A.weight "
                                "and lora_B.weight, or lora_embedding_A and lora_embedding_B (Embedding).")
        missing = [part for part in kind_keys if part not in found]
        if missing:
            raise PeftliteError(f"{source}: missing key '{weight_key(module, missing[0])}' (layer '{module}' has "
                                f"only {sorted(found)}).")
        a, b = found[kind_keys[0]], found[kind_keys[1]]
        if not (a.is_floating_point() and b.is_floating_point()):
            raise PeftliteError(f"{source}: layer '{module}': dtype {a.dtype}/{b.dtype}, expected floating-point "
                                "weights.")
        if a.ndim != b.ndim or not 2 <= a.ndim <= 5:
            raise PeftliteError(f"{source}: layer '{module}' has A of shape {tuple(a.shape)} and B of shape "
                                f"{tuple(b.shape)}; expected 2-D pairs (Linear, Conv1D, Embedding) or 3- to 5-D "
                                "pairs (convolutions).")
        pairs[module] = (kind_keys[0], a, b)
    if not pairs:
        raise PeftliteError(f"{source}: holds no LoRA weights.")
    pairs = dict(sorted(pairs.items()))  # file order is not defined: errors name layers in a stable order
    return pairs, others


def plan_layer(model: nn.Module, path: str, kind_key: str, a: torch.Tensor, b: torch.Tensor, config: dict,
               protected: dict, source: str, name: str) -> LayerPlan:
    """One layer's plan: the module exists and takes LoRA (as for ``inject``), keys, shapes and dtypes fit."""
    key = weight_key(path, kind_key)
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise PeftliteError(f"{source}: unexpected key '{key}': the model has no module '{path}'. "
                            "Is this adapter for another model?") from None
    try:
        kind = check_lora_target(path, module, protected)
    except PeftliteError as err:
        raise PeftliteError(f"{source}: key '{key}': {err}") from None
    if kind.peft_keys[0] != kind_key:
        raise PeftliteError(f"{source}: key '{key}': module '{path}' is a {kind.name}, whose LoRA keys end in "
                            f"'{kind.peft_keys[0]}' and '{kind.peft_keys[1]}'.")
    settings = layer_settings(config, path)
    expected_a, expected_b = kind.shapes(module, settings.rank)
    if tuple(a.shape) != tuple(expected_a) or tuple(b.shape) != tuple(expected_b):
        raise PeftliteError(f"{source}: shape mismatch for layer '{path}': file has A {tuple(a.shape)} and B "
                            f"{tuple(b.shape)}; the model's {kind.name} and the config (r={settings.rank}) need "
                            f"{tuple(expected_a)} and {tuple(expected_b)}.")
    if isinstance(module, LoRALayer) and name in module.lora_settings:
        if module.merged:
            raise PeftliteError(f"{source}: layer '{path}' is merged; call peftlite.unmerge(model) before loading "
                                "new adapter weights.")
        if module.lora_settings[name].rank != settings.rank:
            raise PeftliteError(f"{source}: layer '{path}' already has adapter {name!r} of rank "
                                f"{module.lora_settings[name].rank}, the file has rank {settings.rank}. Call "
                                "peftlite.unload(model, merge=False) first to load a different adapter.")
        return LayerPlan(module, settings, a, b)
    if is_sharded(module.weight):
        raise PeftliteError(f"{source}: layer '{path}' is sharded (FSDP2) and holds no adapter {name!r}; new "
                            "adapters cannot be added to sharded modules. Load (or inject) before fully_shard, or "
                            "load into an adapter the model holds.")
    try:
        add = plan_lora(path, module, name, settings.rank, settings.alpha, settings.dropout, settings.rslora,
                        "default", None)
    except PeftliteError as err:
        raise PeftliteError(f"{source}: {err}") from None
    return LayerPlan(module, settings, a, b, add)


def drop_aliases(plan: LoadPlan, source: str) -> None:
    """A module reachable under two paths (shared) gets one adapter: the file must give both paths the same one."""
    first: dict[int, str] = {}
    for path in list(plan.layers):
        layer = plan.layers[path]
        other = first.setdefault(id(layer.module), path)
        if other == path:
            continue
        kept = plan.layers[other]
        if kept.settings != layer.settings or not (torch.equal(kept.lora_A, layer.lora_A)
                                                   and torch.equal(kept.lora_B, layer.lora_B)):
            raise PeftliteError(f"{source}: layers '{other}' and '{path}' are one module (shared), but the file gives "
                                "them different LoRA values or settings; one module holds one adapter.")
        del plan.layers[path]


def check_fan_in_fan_out(config: dict, plan: LoadPlan, source: str) -> None:
    """``fan_in_fan_out`` must say what the layers are: true exactly when some target is a Conv1D."""
    conv1d = [path for path, layer in plan.layers.items() if CONV1D.matches(layer.module)]
    flag = config.get("fan_in_fan_out", False)
    if flag != bool(conv1d):
        detail = (f"but '{conv1d[0]}' is a transformers Conv1D (weight stored [in, out])" if conv1d
                  else "but no target is a transformers Conv1D")
        raise PeftliteError(f"{source}: fan_in_fan_out is {str(flag).lower()}, {detail}. Is this adapter for "
                            "another model?")


def check_complete(model: nn.Module, config: dict, present: set[str], name: str, source: str) -> None:
    """Every layer the config targets, and every layer holding adapter ``name`` already, must be in the file."""
    holding = {path for path, layer in lora_layers(model).items() if name in layer.lora_settings}
    missing = sorted((configured_targets(model, config) | holding) - present)
    if missing:
        keys = [weight_key(m, kind_of(model.get_submodule(m)).peft_keys[0]) for m in missing[:3]]
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise PeftliteError(f"{source}: missing key {', '.join(map(repr, keys))}{more} (a layer targeted by the "
                            f"config, or already holding adapter {name!r} in the model).")


def check_hot_swap(plan: LoadPlan, name: str, source: str) -> None:
    """Loading over an adapter the model holds replaces its values in place: the same layers, or none."""
    fresh = sorted(path for path, layer in plan.layers.items() if layer.add is not None)
    if fresh and len(fresh) != len(plan.layers):
        raise PeftliteError(f"{source}: the model already holds adapter {name!r}, so loading replaces its values in "
                            f"place, but the file also adapts '{fresh[0]}', which {name!r} does not; a different "
                            "target set is another adapter. Load it under another name, or "
                            "peftlite.delete_adapter(model, name) first.")


def apply_load(plan: LoadPlan, model: nn.Module) -> None:
    """Mutate: add the new adapters or refill held ones in place, set their values, fill the saved modules.

    A refilled layer keeps its settings object where the file's are equal; where alpha or rslora
    differ, B is stored as ``B * scaling_file / scaling_layer`` (one rounding) so the layer's own
    scaling computes the file's delta and compiled graphs, which read the scaling as a constant,
    stay valid. A different dropout replaces the settings (it acts in training only).
    """
    for layer in plan.layers.values():
        if layer.add is not None:
            add_lora(layer.module, *layer.add)
        held = layer.module.lora_settings[plan.name]
        lora_B = layer.lora_B
        if (held.alpha, held.rslora) != (layer.settings.alpha, layer.settings.rslora):
            lora_B = lora_B.double() * (layer.settings.scaling / held.scaling)
        if held.dropout != layer.settings.dropout:
            layer.module.lora_settings[plan.name] = replace(held, dropout=layer.settings.dropout)
        with torch.no_grad():
            assign(layer.module.lora_A[plan.name], layer.lora_A)
            assign(layer.module.lora_B[plan.name], lora_B)
    with torch.no_grad():
        for slot, value in plan.base.values():
            slot.copy_(value)

