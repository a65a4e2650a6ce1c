"""Bottleneck adapters on disk: ``adapter_model.safetensors`` + ``adapter_config.json`` (peftlite's own type).

PEFT has no bottleneck adapters, so the config type is ``peft_type: BOTTLENECK_ADAPTER``, with
one entry per wrapped module (its options); weights are keyed as PEFT keys its tensors:
``base_model.model.<module>.adapter.down.weight`` etc.
"""

import torch
from torch import nn

from ..bottleneck import Adapter, adapter_sizes, check_adapter_options
from ..errors import PeftliteError
from ..model import check_another_bottleneck, replace
from ..sharding import whole
from .lora_format import PREFIX

PEFT_TYPE = "BOTTLENECK_ADAPTER"


def options(adapter: Adapter, name: str) -> dict:
    bottleneck = adapter.adapter[name]
    return {"dim": adapter.dim, "bottleneck": bottleneck.down.out_features, "activation": bottleneck.activation,
            "mode": adapter.mode, "scaling": bottleneck.scaling, "init": bottleneck.init,
            "dropout": bottleneck.dropout.p if isinstance(bottleneck.dropout, nn.Dropout) else 0.0}


def payload(model: nn.Module, name: str) -> tuple[dict, dict]:
    """``(tensors, config)`` of bottleneck adapter ``name`` (keys without the name, as PEFT strips it)."""
    adapters = {path: m for path, m in model.named_modules() if isinstance(m, Adapter) and name in m.adapter}
    if "" in adapters:
        raise PeftliteError("save_adapter needs the model that contains the Adapter, not the Adapter itself.")
    tensors = {f"{PREFIX}{path}.adapter.{key}": whole(tensor).to("cpu").contiguous()
               for path, adapter in adapters.items()
               for key, tensor in adapter.adapter[name].state_dict(keep_vars=True).items()}
    config = {"peft_type": PEFT_TYPE, "task_type": None,
              "modules": {path: options(a, name) for path, a in adapters.items()}}
    return tensors, config


def load(model: nn.Module, config: dict, tensors: dict, source, name: str = "default"):
    """Check every module, key and shape against the model; return the change (a callable) that wraps what
    needs wrapping, adds or refills bottleneck ``name`` and copies the values in. Changes nothing itself."""
    modules = config.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise PeftliteError(f"{source}: 'modules' must map module names to adapter options.")
    if "" in modules:
        raise PeftliteError(f"{source}: 'modules' names the root module (''); a bottleneck adapter wraps a "
                            "submodule of the model.")
    plans = {path: plan(model, path, opts, source, name) for path, opts in modules.items()}
    seen = {}
    for path in plans:  # one module reachable under two paths gets one adapter: the file names it once
        other = seen.setdefault(id(model.get_submodule(path)), path)
        if other != path:
            raise PeftliteError(f"{source}: 'modules' names '{other}' and '{path}', which are one module (shared); "
                                "name it once.")
    expected = {f"{PREFIX}{path}.adapter.{key}": shape for path, (_, shapes) in plans.items()
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

    def apply() -> None:
        replace(model, {path: Adapter(model.get_submodule(path), **opts, name=name)
                        for path, (opts, _) in plans.items() if not isinstance(model.get_submodule(path), Adapter)})
        for path, (opts, _) in plans.items():
            module = model.get_submodule(path)
            if name not in module.adapter:
                sizes = {key: opts[key] for key in ("activation", "scaling", "dropout", "init") if key in opts}
                module.add(name, tensors[f"{PREFIX}{path}.adapter.down.weight"].shape[0], **sizes)
            with torch.no_grad():
                for key, tensor in module.adapter[name].state_dict(keep_vars=True).items():
                    tensor.copy_(tensors[f"{PREFIX}{path}.adapter.{key}"])
    return apply


def plan(model: nn.Module, path: str, opts, source, name: str) -> tuple[dict, dict]:
    """``(constructor options, {state key: shape})`` for one module; raises if it cannot take the adapter."""
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise PeftliteError(f"{source}: the model has no module '{path}'. Is this adapter for another model?") from None
    if not isinstance(opts, dict):
        raise PeftliteError(f"{source}: options of '{path}' must be a JSON object.")
    allowed = {"dim", "bottleneck", "activation", "mode", "scaling", "dropout", "init"}
    opts = {key: value for key, value in opts.items() if key in allowed}
    try:
        check_adapter_options(opts.get("dim"), opts.get("bottleneck"), 16, opts.get("activation", "relu"),
                              opts.get("mode", "sequential"), opts.get("scaling", 1.0), opts.get("dropout", 0.0),
                              opts.get("init", "default"))
        if isinstance(module, Adapter) and name in module.adapter:
            held = options(module, name)
            if any(held[key] != value for key, value in opts.items() if key != "dropout"):
                raise PeftliteError(f"it already has adapter {name!r} with other options ({held}); remove it "
                                    "first with peftlite.delete_adapter(model, name)")
            dim, bottleneck = module.dim, module.adapter[name].down.out_features
        elif isinstance(module, Adapter):
            check_another_bottleneck(module, name, opts.get("dim"), opts.get("bottleneck"), 16,
                                     opts.get("mode", "sequential"))
            dim = module.dim
            bottleneck = opts.get("bottleneck") if opts.get("bottleneck") is not None else dim // 16
        else:
            dim, bottleneck = adapter_sizes(module, opts.get("dim"), opts.get("bottleneck"), 16,
                                            opts.get("mode", "sequential"))
    except PeftliteError as err:
        raise PeftliteError(f"{source}: module '{path}': {err}") from None
    shapes = {"down.weight": (bottleneck, dim), "down.bias": (bottleneck,), "up.weight": (dim, bottleneck),
              "up.bias": (dim,)}
    if opts.get("scaling") in ("learned", "channel"):
        shapes["scale"] = () if opts["scaling"] == "learned" else (dim,)
    return opts, shapes
