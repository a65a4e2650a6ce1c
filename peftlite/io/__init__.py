"""save_adapter / load_adapter: adapters in the Hugging Face PEFT format (safetensors + JSON).

LoRA (``peft_type: LORA``) and prefix tuning (``PREFIX_TUNING``) are read and written as PEFT
does; bottleneck adapters, which PEFT lacks, as ``BOTTLENECK_ADAPTER`` (``bottleneck_format.py``).
The files themselves (atomic writes, strict reads) are ``directory.py``'s; modules saved whole beside
any method, ``saved_modules.py``'s.

Nothing here unpickles: weights are read with safetensors and the config with ``json``.
Loading is strict: a missing or unexpected key, a shape that does not fit, an unreadable file
or an unsupported config raises :class:`PeftliteError` and leaves the model unchanged.
"""

from pathlib import Path

from torch import nn

from . import bottleneck_format, lora_format, prefix_format, saved_modules
from .directory import CONFIG_NAME, WEIGHTS_NAME, as_path, check_same_save, read_config, read_weights, write_adapter
from ..errors import PeftliteError, check_adapter_name
from ..fast_path import sync_fast_path_guards
from ..model import adapter_modules, freeze_all_but_adapters, is_adapted, refuse_meta, require_lora, unwrap
from ..prefix import attach as prefix_attach

def check_finite(tensors: dict, source: str) -> None:
    """Every floating-point value in the file must be finite: NaN or Inf would load as a broken adapter."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
            raise PeftliteError(f"{source}: '{key}' holds NaN or Inf values; the adapter is corrupt or diverged.")


KEY_PREFIX = {"LORA": "base_model.model.", bottleneck_format.PEFT_TYPE: "base_model.model.",  # as PEFT writes
              "PREFIX_TUNING": "base_model."}  # the state of modules saved whole (saved_modules.py)
METHODS = ("lora", "adapter", "prefix")


def save_adapter(model: nn.Module, directory, method: str | None = None, name: str = "default") -> Path:
    """Write the model's adapter weights and config to ``directory`` (created if needed), atomically; return it.

    Files: ``adapter_model.safetensors`` and ``adapter_config.json``. LoRA and prefix tuning are
    loadable by ``peft.PeftModel.from_pretrained(base_model, directory)`` and by
    :func:`load_adapter`; bottleneck adapters by :func:`load_adapter`. One method and one
    adapter (``name``) per directory, as in PEFT: a model with several methods needs
    ``method="lora" | "adapter" | "prefix"``. LoRA is saved as trained, whether or not it is
    merged; trained heads (``inject(trainable=...)``) and leaf modules whose own parameters were
    made trainable are saved whole, as PEFT's ``modules_to_save``. A reparameterized prefix is
    saved as the table it produces. A wrapped model (DDP, ``torch.compile``) is saved with the keys
    of the bare model.
    """
    model = unwrap(model)
    check_adapter_name(name)
    refuse_meta(model, "save_adapter")
    present = present_methods(model)
    if not present:
        require_lora(model, "save_adapter")
    if method is not None and method not in METHODS:
        raise PeftliteError(f"method={method!r}: expected one of {', '.join(map(repr, METHODS))}, or None.")
    if method is None and len(present) > 1:
        raise PeftliteError(f"the model has {' and '.join(present)}; a directory holds one method, as in PEFT. Save "
                            "each in its own directory: save_adapter(model, 'out/lora', method='lora'), ...")
    method = present[0] if method is None else method
    if method not in present:
        raise PeftliteError(f"method={method!r}: the model has no such adapter; it has {', '.join(present)}.")
    if method == "lora":
        tensors, config = lora_payload(model, name)
    else:
        tensors, config = (bottleneck_format if method == "adapter" else prefix_format).payload(model)
    whole = saved_modules.trained_modules(model)
    tensors.update(saved_modules.tensors(whole, KEY_PREFIX[config["peft_type"]]))
    config["modules_to_save"] = sorted(whole) or None
    directory = as_path(directory)
    write_adapter(directory, tensors, config)
    return directory


def present_methods(model: nn.Module) -> list[str]:
    found = {"lora": bool(lora_format.lora_layers(model)), "adapter": bool(adapter_modules(model)),
             "prefix": prefix_attach.prefix_encoder(model) is not None}
    return [method for method, here in found.items() if here]


def lora_payload(model: nn.Module, name: str) -> tuple[dict, dict]:
    layers = {path: layer for path, layer in lora_format.lora_layers(model).items() if name in layer.lora_settings}
    if not layers:
        raise PeftliteError(f"save_adapter: no LoRA layer holds an adapter named {name!r}.")
    if "" in layers:
        raise PeftliteError("save_adapter needs a model that contains the LoRA layer, not the layer itself.")
    return lora_format.adapter_tensors(layers, name), lora_format.build_config(model, layers, name)


def load_adapter(model: nn.Module, directory, name: str = "default") -> nn.Module:
    """Load an adapter saved by :func:`save_adapter` or by PEFT (LoRA, prefix tuning) into ``model``, in place.

    LoRA: layers without LoRA yet get adapter ``name`` with the rank, alpha, rslora and dropout of
    the file (float32 adapters on 16-bit bases); layers already holding adapter ``name`` must have
    the file's rank and get its values. Every target is checked as ``inject`` checks it. Modules
    in the config's ``modules_to_save`` get the file's values and train, as trained heads.
    Prefix tuning: the model gets ``model.prefix_encoder`` (or, if it has one of the same shape,
    new values). Bottleneck adapters: the named modules are wrapped (or refilled). The whole file
    is checked before anything changes. Every other parameter is frozen, as by ``inject``.
    Returns ``model``.
    """
    bare = unwrap(model)
    check_adapter_name(name)
    refuse_meta(bare, "load_adapter")
    directory = as_path(directory)
    config_path = directory / CONFIG_NAME
    config = read_config(config_path)
    tensors, metadata = read_weights(directory)
    source = str(directory / WEIGHTS_NAME)
    check_finite(tensors, source)
    kind = config.get("peft_type")
    if kind not in ("PREFIX_TUNING", bottleneck_format.PEFT_TYPE):
        lora_format.check_config(config, str(config_path))  # LORA's fields, or names an unsupported peft_type
    heads = saved_modules.listed(bare, config, str(config_path))
    whole, rest = saved_modules.split(tensors, heads, KEY_PREFIX[kind])
    values = saved_modules.plan(bare, heads, whole, source, KEY_PREFIX[kind])
    if kind == "LORA":
        plan = lora_format.plan_load(bare, config, rest, source, name, heads)
        check_same_save(directory, config, metadata)
        lora_format.apply_load(plan, bare)
    else:  # these check the whole file before changing the model
        (prefix_format if kind == "PREFIX_TUNING" else bottleneck_format).load(
            bare, config, rest, source, before_change=lambda: check_same_save(directory, config, metadata))
    saved_modules.apply(bare, values, heads)
    freeze_all_but_adapters(bare)
    sync_fast_path_guards(bare, is_adapted)
    return model
