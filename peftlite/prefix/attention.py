"""How prefix tuning reaches an attention module: which modules qualify and the hooks that extend them.

Three kinds of attention are supported, each by forward hooks on the module itself (its code
and class are untouched; :func:`peftlite.unload` removes the hooks):

1. ``nn.MultiheadAttention``: the prefixes are prepended to its key and value *inputs*
   ([P, embed_dim] each), and ``key_padding_mask``/``attn_mask`` get P visible columns. MHA
   projects them itself, so its prefix keys are ``Pk W_k^T + b_k``: the same family of
   prefixes (``W_k`` is square), reached through MHA's own projection.
2. Hugging Face attention (Llama with grouped-query attention, GPT-2, BERT, ...), run with
   ``attn_implementation="sdpa"`` (the default), and
3. any module that follows the :class:`PrefixAttention` protocol.

For 3 (and Hugging Face models whose transformers has no attention registry), while the
module runs, its one call to ``F.scaled_dot_product_attention`` gets the prefix keys/values
prepended (after rotary embeddings, before the score) and a mask in which every query sees
every prefix position. Hugging Face models on SDPA get the same through their attention
registry instead (``hf_attention.py``), which touches no other call. ``is_causal=True``
becomes an explicit causal mask aligned bottom-right, so real tokens stay causal among
themselves (SDPA's own flag aligns top-left when key and query lengths differ, which would be
wrong here). A forward in which the prefixed attention ran zero times or twice raises
:class:`PeftliteError` instead of silently returning the base output.
"""

import functools
import inspect
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import PeftliteError
from .encoder import PrefixEncoder

HEAD_DIM_NAMES = ("head_dim", "attention_head_size")
HEADS_NAMES = ("num_kv_heads", "num_key_value_heads", "num_heads", "num_attention_heads")


@runtime_checkable
class PrefixAttention(Protocol):
    """A custom attention module prefix tuning can extend.

    - ``head_dim``: int, the size of one head;
    - ``num_kv_heads`` (or ``num_heads``): int, the number of key/value heads;
    - its forward calls ``torch.nn.functional.scaled_dot_product_attention`` exactly once, with
      keys and values shaped [..., heads, seq, head_dim], heads being ``num_kv_heads`` or a
      multiple of it (grouped-query attention with keys repeated, or ``enable_gqa=True``).
    """

    head_dim: int
    num_kv_heads: int


def int_attribute(source, names: tuple[str, ...]) -> int | None:
    for name in names:
        value = getattr(source, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def kv_shape(module: nn.Module) -> tuple[int, int] | None:
    """``(key/value heads, head_dim)`` of an attention module, or ``None`` if it is not one we know."""
    if isinstance(module, nn.MultiheadAttention):
        return module.num_heads, module.head_dim
    if isinstance(module, PrefixEncoder):
        return None
    head_dim = int_attribute(module, HEAD_DIM_NAMES)
    if head_dim is None:
        return None
    heads = int_attribute(module, HEADS_NAMES) or int_attribute(getattr(module, "config", None),
                                                                 ("num_key_value_heads", "num_attention_heads"))
    return None if heads is None else (heads, head_dim)


def default_attention(modules: list[tuple[str, nn.Module]]) -> list[str]:
    """Every self-attention module, innermost first found: what ``inject(method="prefix")`` adapts by default."""
    found = [name for name, m in modules if kv_shape(m) is not None and not getattr(m, "is_cross_attention", False)]
    return [name for name in found if not any(other.startswith(name + ".") for other in found)]


def check_attention(name: str, module: nn.Module) -> tuple[int, int]:
    shape = kv_shape(module)
    if shape is None:
        raise PeftliteError(f"module '{name}' is a {type(module).__name__}, not an attention module prefix tuning can "
                            "extend: expected nn.MultiheadAttention, a Hugging Face attention module, or a module "
                            "with head_dim and num_kv_heads attributes that calls F.scaled_dot_product_attention "
                            "(peftlite.attention.PrefixAttention).")
    if isinstance(module, nn.MultiheadAttention) and not module._qkv_same_embed_dim:
        raise PeftliteError(f"module '{name}': nn.MultiheadAttention with kdim/vdim != embed_dim "
                            f"({module.kdim}/{module.vdim} vs {module.embed_dim}) is not supported by prefix tuning.")
    return shape


def visible_columns(mask: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` mask columns that let every query see the prefix: True (bool masks) or 0 (additive)."""
    value = True if mask.dtype == torch.bool else 0
    return mask.new_full((*mask.shape[:-1], count), value)


def blocked_columns(mask: torch.Tensor, count: int) -> torch.Tensor:
    """The same for masks where True means *ignore* (MultiheadAttention's convention)."""
    value = False if mask.dtype == torch.bool else 0
    return mask.new_full((*mask.shape[:-1], count), value)


def sdpa_mask(mask, is_causal: bool, queries: int, keys: int, prefix: int, device) -> torch.Tensor | None:
    """The SDPA mask over [prefix ; keys]: prefix visible to all queries, the rest as given.

    ``is_causal`` means query i sees real key j iff ``j <= i + keys - queries`` (bottom-right).
    """
    if mask is None and not is_causal:
        return None
    if mask is None:
        mask = torch.ones(queries, keys, dtype=torch.bool, device=device).tril(keys - queries)
    mask = mask.expand(*mask.shape[:-1], keys)
    return torch.cat([visible_columns(mask, prefix), mask], dim=-1)


def sdpa_with_prefix(prefix: torch.Tensor, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                     scale=None, enable_gqa=False):
    """``F.scaled_dot_product_attention`` over ``[prefix keys ; key]`` and ``[prefix values ; value]``.

    prefix: [2, H_kv, P, hd]; key, value: [..., H, L, hd] with H a multiple of H_kv.
    """
    if key.dim() < 3 or key.shape[-3] % prefix.shape[1] or key.shape[-1] != prefix.shape[-1]:
        raise PeftliteError(f"scaled_dot_product_attention got keys of shape {tuple(key.shape)}; the prefix has "
                            f"{prefix.shape[1]} heads of size {prefix.shape[-1]}. Keys must be [..., heads, seq, "
                            "head_dim] with heads a multiple of the prefix's.")
    groups = key.shape[-3] // prefix.shape[1]
    pk, pv = (p.repeat_interleave(groups, dim=0).to(key.dtype).expand(*key.shape[:-2], -1, -1) for p in prefix)
    mask = sdpa_mask(attn_mask, is_causal, query.shape[-2], key.shape[-2], prefix.shape[2], key.device)
    extra = {"scale": scale} if scale is not None else {}
    if enable_gqa:
        extra["enable_gqa"] = True
    return F.scaled_dot_product_attention(query, torch.cat([pk, key], -2), torch.cat([pv, value], -2),
                                          attn_mask=mask, dropout_p=dropout_p, is_causal=False, **extra)


class SdpaPrefix(TorchFunctionMode):
    """While active, ``F.scaled_dot_product_attention`` attends to ``prefix`` too; counts its calls."""

    def __init__(self, prefix: torch.Tensor):
        super().__init__()
        self.prefix, self.calls = prefix, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        self.calls += 1
        return sdpa_with_prefix(self.prefix, *args, **kwargs)


class PrefixState:
    """One forward's prefix and how many times it was applied (the registry path's :class:`SdpaPrefix`)."""

    def __init__(self, prefix: torch.Tensor):
        self.prefix, self.calls = prefix, 0


class SdpaHook:
    """Forward pre-hook + always-called forward hook around one SDPA-based attention module.

    ``before`` derives the layer's prefix; with ``intercept`` it also enters :class:`SdpaPrefix`, which
    extends the module's SDPA call. Without, a Hugging Face attention function registered by
    ``hf_attention`` reads the prefix from ``active`` and extends the call itself. ``after`` checks the
    prefix was applied exactly once.
    """

    def __init__(self, encoder: nn.Module, layer: int, name: str, intercept: bool = True):
        self.encoder, self.layer, self.name, self.intercept = encoder, layer, name, intercept
        self.active: list = []  # SdpaPrefix or PrefixState per forward in progress

    def before(self, module, args):
        prefix = self.encoder(self.layer)
        state = SdpaPrefix(prefix) if self.intercept else PrefixState(prefix)
        if self.intercept:
            state.__enter__()
        self.active.append(state)

    def after(self, module, args, output):
        state = self.active.pop()
        if self.intercept:
            state.__exit__(None, None, None)
        if output is not None and state.calls != 1:  # None: the forward raised; let that error through
            raise PeftliteError(
                f"attention module '{self.name}' ran scaled-dot-product attention {state.calls} times in one "
                "forward, so its prefix was not applied exactly once. Hugging Face models: load them with "
                "attn_implementation='sdpa' (and keep it). Custom modules: follow peftlite.attention.PrefixAttention.")


class MultiheadPrefixHook:
    """Forward pre-hook (with kwargs) that extends an ``nn.MultiheadAttention`` call by the prefix."""

    def __init__(self, encoder: nn.Module, layer: int, name: str):
        self.encoder, self.layer, self.name = encoder, layer, name
        self.calls = 0

    def __call__(self, module: nn.MultiheadAttention, args, kwargs):
        self.calls += 1
        call = dict(forward_signature(type(module)).bind(*args, **kwargs).arguments)
        keys, values = self.encoder(self.layer).permute(0, 2, 1, 3).flatten(2)  # 2 x (P, E)
        batched = call["query"].dim() == 3
        for role, prefix in (("key", keys), ("value", values)):
            call[role] = prepend_inputs(call[role], prefix.to(call[role].dtype), batched, module.batch_first)
        prefix_len = keys.shape[0]
        if call.get("key_padding_mask") is not None:
            call["key_padding_mask"] = torch.cat([blocked_columns(call["key_padding_mask"], prefix_len),
                                                  call["key_padding_mask"]], dim=-1)
        mask, causal = call.get("attn_mask"), call.get("is_causal", False)
        if mask is None and causal:  # MHA requires the mask with is_causal; build the square one
            count = call["query"].shape[1 if batched and module.batch_first else 0]
            mask = torch.ones(count, count, dtype=torch.bool, device=keys.device).triu(1)
        if mask is not None:
            call["attn_mask"] = torch.cat([blocked_columns(mask, prefix_len), mask], dim=-1)
        if "is_causal" in call:
            call["is_causal"] = False  # the mask is no longer the plain square causal one
        return with_arguments(module, args, kwargs, call)


@functools.lru_cache(maxsize=None)
def forward_signature(cls: type) -> inspect.Signature:
    """The signature of ``cls.forward`` without ``self`` (computed once per class: hooks run every call)."""
    signature = inspect.signature(cls.forward)
    return signature.replace(parameters=list(signature.parameters.values())[1:])


def with_arguments(module: nn.Module, args: tuple, kwargs: dict, new: dict) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of a call to ``module`` with the arguments in ``new`` replaced or added.

    Arguments stay where the caller put them (positional or keyword), so decorators around
    ``forward`` that add keywords of their own see the call as it was.
    """
    names = list(forward_signature(type(module)).parameters)
    args, kwargs = list(args), dict(kwargs)
    for name, value in new.items():
        index = names.index(name) if name in names else len(args)
        if index < len(args):
            args[index] = value
        else:
            kwargs[name] = value
    return tuple(args), kwargs


def prepend_inputs(inputs: torch.Tensor, prefix: torch.Tensor, batched: bool, batch_first: bool) -> torch.Tensor:
    """``[prefix ; inputs]`` along the sequence axis of an MHA key/value input."""
    if not batched:
        return torch.cat([prefix, inputs], dim=0)  # (P + S, E)
    if batch_first:
        return torch.cat([prefix.expand(inputs.shape[0], -1, -1), inputs], dim=1)  # (B, P + S, E)
    return torch.cat([prefix.unsqueeze(1).expand(-1, inputs.shape[1], -1), inputs], dim=0)  # (P + S, B, E)


HOOK = "_peftlite_prefix_hook"  # where a Hugging Face attention module keeps its SdpaHook (not module state)


class Detach:
    """A handle whose ``remove()`` takes the SdpaHook reference off the module again."""

    def __init__(self, module: nn.Module):
        self.module = module

    def remove(self) -> None:
        self.module.__dict__.pop(HOOK, None)


def attach(module: nn.Module, encoder: nn.Module, layer: int, name: str, intercept: bool = True) -> list:
    """Hook ``module`` up to layer ``layer`` of ``encoder``; return the hook handles.

    ``intercept=False``: the module's attention runs through ``hf_attention.prefix_attention``,
    which finds the hook at ``module.<HOOK>``; no torch-function interception.
    """
    if isinstance(module, nn.MultiheadAttention):
        hook = MultiheadPrefixHook(encoder, layer, name)
        return [module.register_forward_pre_hook(hook, with_kwargs=True)]
    hook = SdpaHook(encoder, layer, name, intercept)
    handles = [module.register_forward_pre_hook(hook.before),
               module.register_forward_hook(hook.after, always_call=True)]
    if not intercept:
        module.__dict__[HOOK] = hook
        handles.append(Detach(module))
    return handles
