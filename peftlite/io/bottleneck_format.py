"""Bottleneck adapters on disk: ``adapter_model.safetensors`` + ``adapter_config.json`` (peftlite's own type).

PEFT has no bottleneck adapters, so the config type is ``peft_type: BOTTLENECK_ADAPTER``, with
one entry per wrapped module (its options); weights are keyed as PEFT keys its tensors:
``base_model.model.<module>.adapter.down.weight`` etc.
"""

import torch
from torch import nn

from ..bottleneck import Adapter, adapter_sizes, check_adapter_options
from ..errors import PeftliteError
from ..model import replace
from .lora_format import PREFIX

PEFT_TYPE = "BOTTLENECK_ADAPTER"


def options(adapter: Adapter) -> dict:
    bottleneck = adapter.bottleneck
    return {"dim": adapter.dim, "bottleneck": bottleneck.down.out_features, "activation": bottleneck.activation,
            "mode": adapter.mode, "scaling": bottleneck.scaling, "init": bottleneck.init,
            "dropout": bottleneck.dropout.p if isinstance(bottleneck.dropout, nn.Dropout) else 0.0}


def payload(model: nn.Module) -> tuple[dict, dict]:
    adapters = {name: m for name, m in model.named_modules() if isinstance(m, Adapter)}
    if "" in adapters:
        raise PeftliteError("save_adapter needs the model that contains the Adapter, not the Adapter itself.")
    tensors = {f"{PREFIX}{name}.adapter.{key}": tensor.detach().to("cpu").contiguous()
               for name, adapter in adapters.items() for key, tensor in adapter.bottleneck.state_dict().items()}
    config = {"peft_type": PEFT_TYPE, "task_type": None, "modules": {n: options(a) for n, a in adapters.items()}}
    return tensors, config


def load(model: nn.Module, config: dict, tensors: dict, source, before_change=lambda: None) -> None:
    """Check every module, key and shape, call ``before_change`` (the caller's last check), then wrap what needs
    wrapping and copy the values in."""
    modules = config.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise PeftliteError(f"{source}: 'modules' must map module names to adapter options.")
    if "" in modules:
        raise PeftliteError(f"{source}: 'modules' names the root module (''); a bottleneck adapter wraps a "
                            "submodule of the model.")
    plans = {name: plan(model, name, opts, source) for name, opts in modules.items()}
    expected = {f"{PREFIX}{name}.adapter.{key}": shape for name, (_, shapes) in plans.items()
                for key, shape in shapes.items()}
    for key in sorted(set(tensors) | set(expected)):
        if key not in expected:
            raise PeftliteError(f"{source}: unexpected key '{key}' (not the state of an adapter in the config).")
        if key not in tensors:
            raise PeftliteError(f"{source}: missing key '{key}'.")
        if not tensors[key].is_floating_point():
            raise PeftliteError(f"{source}: '{key}' has dtype {tensors[key].dtype}; expected floating-point values.")
        if tuple(tensors[key].shape) != expected[key]:
            raise PeftliteError(f"shape mismatch for '{key}': file has {tuple(tensors[key].shape)}, the model and "
                                f"config need {expected[key]}.")
    before_change()
    replace(model, {name: Adapter(model.get_submodule(name), **opts) for name, (opts, _) in plans.items()
                    if not isinstance(model.get_submodule(name), Adapter)})
    with torch.no_grad():
        for name in plans:
            state = model.get_submodule(name).bottleneck.state_dict(keep_vars=True)
            for key, tensor in state.items():
                tensor.copy_(tensors[f"{PREFIX}{name}.adapter.{key}"])


def plan(model: nn.Module, name: str, opts, source) -> tuple[dict, dict]:
    """``(constructor options, {state key: shape})`` for one module; raises if it cannot take the adapter."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise PeftliteError(f"{source}: the model has no module '{name}'. Is this adapter for another model?") from None
    if not isinstance(opts, dict):
        raise PeftliteError(f"{source}: options of '{name}' must be a JSON object.")
    allowed = {"dim", "bottleneck", "activation", "mode", "scaling", "dropout", "init"}
    opts = {key: value for key, value in opts.items() if key in allowed}
    try:
        check_adapter_options(opts.get("dim"), opts.get("bottleneck"), 16, opts.get("activation", "relu"),
                              opts.get("mode", "sequential"), opts.get("scaling", 1.0), opts.get("dropout", 0.0),
                              opts.get("init", "default"))
        if isinstance(module, Adapter):
            if any(options(module)[key] != value for key, value in opts.items() if key != "dropout"):
                raise PeftliteError(f"it already has an adapter with other options ({options(module)}); call "
                                    "peftlite.unload(model) first")
            dim, bottleneck = module.dim, module.bottleneck.down.out_features
        else:
            dim, bottleneck = adapter_sizes(module, opts.get("dim"), opts.get("bottleneck"), 16,
                                            opts.get("mode", "sequential"))
    except PeftliteError as err:
        raise PeftliteError(f"{source}: module '{name}': {err}") from None
    shapes = {"down.weight": (bottleneck, dim), "down.bias": (bottleneck,), "up.weight": (dim, bottleneck),
              "up.bias": (dim,)}
    if opts.get("scaling") in ("learned", "channel"):
        shapes["scale"] = () if opts["scaling"] == "learned" else (dim,)
    return opts, shapes
