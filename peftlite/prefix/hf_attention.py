"""Prefix tuning through Hugging Face's attention registry, for models running ``attn_implementation="sdpa"``.

peftlite registers one more attention implementation, ``peftlite_prefix_sdpa``: Hugging Face's
own SDPA attention, called with the module's prefix keys/values prepended and the mask
extended (prefix visible to every query; causal masks made explicit and aligned bottom-right).
A model given a prefix is switched to it (``model.set_attn_implementation``) and switched back
by ``unload``. Unlike the generic interception (``attention.SdpaPrefix``), no other torch call
of the attention module is touched, which keeps decoding cheap. Modules the model runs without
a prefix (or outside a forward hook) get plain SDPA attention.
"""

import torch
from torch import nn

from .attention import HOOK, sdpa_mask

NAME = "peftlite_prefix_sdpa"


def prefix_attention(module, query, key, value, attention_mask, **kwargs):
    """Hugging Face's ``sdpa_attention_forward`` over ``[prefix ; key]``, ``[prefix ; value]``.

    query: [B, H, Lq, hd]; key, value: [B, H_kv, Lk, hd] (not yet repeated for GQA); the
    prefix: [2, H_kv, P, hd]; attention_mask: None or [B, 1, Lq, Lk] (bool or additive).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    hook = module.__dict__.get(HOOK)
    if hook is None or not hook.active:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    state = hook.active[-1]
    state.calls += 1
    prefix = state.prefix.to(key.dtype)
    groups = key.shape[1] // prefix.shape[1]  # 1 unless the keys arrive already repeated
    pk, pv = (p.repeat_interleave(groups, dim=0).expand(key.shape[0], -1, -1, -1) for p in prefix)
    causal = attention_mask is None and query.shape[2] > 1 and getattr(module, "is_causal", True)
    mask = sdpa_mask(attention_mask, causal, query.shape[2], key.shape[2], prefix.shape[2], key.device)
    if mask is not None and mask.dim() == 2:
        mask = mask[None, None]  # [1, 1, Lq, P + Lk]
    return sdpa_attention_forward(module, query, torch.cat([pk, key], 2), torch.cat([pv, value], 2), mask, **kwargs)


def register() -> bool:
    """Register ``NAME`` with Hugging Face's attention and mask registries; False if this transformers cannot."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask as hf_sdpa_mask
    except ImportError:
        return False
    AttentionInterface.register(NAME, prefix_attention)
    AttentionMaskInterface.register(NAME, hf_sdpa_mask)
    return True


class Restore:
    """A handle whose ``remove()`` puts the model's previous attention implementation back."""

    def __init__(self, model: nn.Module, previous: str):
        self.model, self.previous = model, previous

    def remove(self) -> None:
        self.model.set_attn_implementation(self.previous)


def switch(model: nn.Module) -> list:
    """Run ``model``'s attention through ``NAME`` if it is a Hugging Face model on SDPA; return the handles.

    Returns ``[]`` (nothing changed) when the model is not one, runs another implementation
    (eager, flash: the generic path then reports that SDPA never ran), or this transformers
    version has no attention registry.
    """
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return []
    if not register():
        return []
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, TypeError, KeyError):
        return []
    return [Restore(model, "sdpa")]
