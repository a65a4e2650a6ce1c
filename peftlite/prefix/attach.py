"""Prefix tuning over a whole model: one :class:`PrefixEncoder` at ``model.prefix_encoder[name]`` feeding every
target attention layer through hooks (see :mod:`peftlite.attention`).

Hugging Face models also get real tokens moved after the prefix: their position ids are
offset by ``prefix_len`` (given ones too), as if the prefix were ``prefix_len`` tokens before
the sequence. That is where PEFT's ``past_key_values`` prefix puts them, so adapters trained
by either library give the same logits in the other.
"""

import inspect

import torch
from torch import nn

from . import attention, hf_attention
from ..errors import PeftliteError
from .encoder import PrefixEncoder, check_prefix_options

SLOT = "prefix_encoder"


def prefix_encoder(model: nn.Module) -> PrefixEncoder | None:
    """The model's prefix encoder, held by adapter name in ``model.prefix_encoder`` (an ``nn.ModuleDict``)."""
    slot = model._modules.get(SLOT)
    if not isinstance(slot, nn.ModuleDict):
        return None
    return next((encoder for encoder in slot.values() if isinstance(encoder, PrefixEncoder)), None)


def plan_prefix(model: nn.Module, names: list[str], prefix_len: int, projection_dim) -> tuple[int, int]:
    """Check everything ``install_prefix`` needs; return the shared (kv heads, head_dim)."""
    check_prefix_options(1, 1, 1, prefix_len, projection_dim)
    if prefix_encoder(model) is not None:
        raise PeftliteError("the model already has a prefix (model.prefix_encoder). Call peftlite.unload(model) "
                            "first to start over.")
    if isinstance(model, nn.Sequential):
        raise PeftliteError("prefix tuning adds model.prefix_encoder, which would become a layer of this "
                            "nn.Sequential and run in its forward. Put the Sequential inside a module of your own "
                            "(or an nn.ModuleList) and inject into that.")
    if SLOT in model._modules or hasattr(model, SLOT):
        raise PeftliteError(f"the model already has an attribute '{SLOT}', where the prefix would go.")
    shapes = {name: attention.check_attention(name, model.get_submodule(name)) for name in names}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"'{n}': {h} heads x {d}" for n, (h, d) in list(shapes.items())[:4])
        raise PeftliteError(f"the target attention layers differ in key/value shape ({listed}); one PrefixEncoder "
                            "needs them equal. Narrow targets to layers of one shape.")
    return next(iter(shapes.values()))


def install_prefix(model: nn.Module, names: list[str], shape: tuple[int, int], prefix_len: int,
                   projection_dim, adapter_name: str = "default") -> PrefixEncoder:
    """Mutate: add ``model.prefix_encoder[adapter_name]`` and hook every target attention up to its layer."""
    modules, seen = [], set()
    for name in names:
        module = model.get_submodule(name)
        if id(module) not in seen:
            seen.add(id(module))
            modules.append((name, module))
    reference = next(modules[0][1].parameters(), None)
    dtype = torch.float64 if reference is not None and reference.dtype == torch.float64 else torch.float32
    device = reference.device if reference is not None else None
    encoder = PrefixEncoder(len(modules), *shape, prefix_len, projection_dim).to(device=device, dtype=dtype)
    switched = hf_attention.switch(model)  # Hugging Face on SDPA: extend attention via its registry
    handles = list(switched)
    for layer, (name, module) in enumerate(modules):
        registry = bool(switched) and hasattr(module, "config") and not isinstance(module, nn.MultiheadAttention)
        handles += attention.attach(module, encoder, layer, name, intercept=not registry)
    handles += position_shift(model, prefix_len)
    handles += bypass_check(model, [m for _, m in modules])
    encoder.__dict__["handles"] = handles
    encoder.__dict__["targets"] = [name for name, _ in modules]
    setattr(model, SLOT, nn.ModuleDict({adapter_name: encoder}))  # state-dict keys prefix_encoder.<name>.*
    return encoder


def remove_prefix(model: nn.Module) -> None:
    encoder = prefix_encoder(model)
    for handle in encoder.__dict__.pop("handles", []):
        handle.remove()
    delattr(model, SLOT)


def hugging_face_backbone(model: nn.Module) -> nn.Module | None:
    """The module that turns token ids into positions (``model.base_model``) if it takes ``position_ids``."""
    if not hasattr(model, "config"):
        return None
    backbone = getattr(model, "base_model", None)
    if not isinstance(backbone, nn.Module):
        return None
    return backbone if "position_ids" in inspect.signature(backbone.forward).parameters else None


class PositionShift:
    """Forward pre-hook: ``position_ids <- position_ids + P``, with the default ids made explicit first."""

    def __init__(self, prefix_len: int):
        self.prefix_len = prefix_len

    def __call__(self, module, args, kwargs):
        call = kwargs if not args else attention.forward_signature(type(module)).bind(*args, **kwargs).arguments
        positions = call.get("position_ids")
        if positions is None:
            tokens = call.get("input_ids")
            tokens = tokens if tokens is not None else call.get("inputs_embeds")
            if tokens is None:
                return None
            past = call.get("past_key_values")
            start = past.get_seq_length() if past is not None and hasattr(past, "get_seq_length") else 0
            count = tokens.shape[1]
            positions = torch.arange(start, start + count, device=tokens.device).expand(tokens.shape[0], count)
        return attention.with_arguments(module, args, kwargs, {"position_ids": positions + self.prefix_len})


def position_shift(model: nn.Module, prefix_len: int) -> list:
    backbone = hugging_face_backbone(model)
    if backbone is None:
        return []
    return [backbone.register_forward_pre_hook(PositionShift(prefix_len), with_kwargs=True)]


class BypassCheck:
    """Root hooks: every ``nn.MultiheadAttention`` inside an encoder layer must have run each forward.

    Such a layer can skip its attention module for a fused kernel; peftlite keeps it off that
    path (:mod:`peftlite.fast_path`), and this check makes sure, raising if it ever happens.
    """

    def __init__(self, hooks: list):
        self.hooks = hooks

    def before(self, module, args):
        for hook in self.hooks:
            hook.calls = 0

    def after(self, module, args, output):
        skipped = [hook.name for hook in self.hooks if hook.calls == 0]
        if skipped:
            raise PeftliteError(f"attention '{skipped[0]}' was bypassed (a fused encoder-layer kernel ran instead), "
                                "so its prefix was not applied. Disable the fast path with "
                                "torch.backends.mha.set_fastpath_enabled(False).")


def bypass_check(model: nn.Module, targets: list[nn.Module]) -> list:
    inside = {id(m) for layer in model.modules() if isinstance(layer, nn.TransformerEncoderLayer)
              for m in layer.modules()}
    hooks = [hook for m in targets if id(m) in inside for hook in m._forward_pre_hooks.values()
             if isinstance(hook, attention.MultiheadPrefixHook)]
    if not hooks:
        return []
    check = BypassCheck(hooks)
    return [model.register_forward_pre_hook(check.before), model.register_forward_hook(check.after)]
