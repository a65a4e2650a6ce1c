"""Layer kinds: what LoRA needs to know about each module type it adapts, one small object per type.

Every kind adds a low-rank term to the module's own output, ``y = base(x) + scaling * branch(x)``,
and can fold the same term into the stored weight, ``W <- W + scaling * delta``:

============  ===================  ==================  ===================================  ==============
kind          A                    B                   branch(x)                            delta layout
============  ===================  ==================  ===================================  ==============
Linear        [r, in]              [out, r]            x A^T B^T                            [out, in]
Conv1D        [r, in]              [out, r]            x A^T B^T                            [in, out]
Embedding     [r, num_embeddings]  [dim, r]            rows of A^T looked up by ids, B^T    [num, dim]
ConvNd        [r, in, *kernel]     [out, r, 1, ...]    conv(x, A) then 1x1 conv(., B)       [out, in, *k]
============  ===================  ==================  ===================================  ==============

Linear covers ``nn.Linear`` and every subclass (the subclass's own forward still runs);
Conv1D is transformers' GPT-2 layer (weight stored ``[in, out]``); ConvNd is ``nn.Conv1d/2d/3d`` with
``groups=1`` and any kernel, stride, padding, padding mode and dilation. Each kind computes the
branch in two halves, ``expand(shrink(x, A), B)``: the adapters of one layer stacked (A along its
first axis, B along its second) go through one pair, which is how per-row batches run. The shapes and key
names are those of Hugging Face PEFT's files. Adding a kind is one object here plus one row in the
parametrized kind suite (``tests/test_kinds.py``).
"""

import math
import sys
from typing import Protocol

import einops
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .errors import PeftliteError


class Kind(Protocol):
    """What LoRA needs to know about one module type."""

    name: str  # shown in messages and docs
    peft_keys: tuple[str, str]  # PEFT's key suffixes for A and B in adapter files
    takes_dropout: bool  # whether LoRA dropout applies to the branch's input (PEFT: not for Embedding)

    def matches(self, module: nn.Module) -> bool:
        """Whether ``module`` is of this kind."""

    def check(self, module: nn.Module) -> str | None:
        """Why this module of the kind cannot take LoRA, or None when it can."""

    def shapes(self, module: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of A and B for ``rank``."""

    def init_(self, lora_A: torch.Tensor, lora_B: torch.Tensor, init: str, rank: int) -> None:
        """Draw the adapter's starting values in place, such that ``delta = B A = 0``."""

    def shrink(self, module: nn.Module, x: torch.Tensor, lora_A: torch.Tensor) -> torch.Tensor:
        """The first half of the branch: ``x`` through A, rank on ``rank_axis``. A stacks along its first axis."""

    def expand(self, module: nn.Module, t: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
        """The second half: ``shrink``'s output through B, in the module's output layout (the caller folds the
        scaling into B). B stacks along its second axis."""

    def rank_axis(self, t: torch.Tensor) -> int | None:
        """The axis of ``shrink``'s output ``t`` that holds the rank; None when ``t`` has no leading batch axis."""

    def merges(self, cls: type) -> bool:
        """Whether ``cls`` runs the kind's own forward (a subclass that overrides it may do anything). Where it
        does, adding ``delta`` to the weight gives what the unmerged forward computes, and the output may be
        updated in place (the kinds' forwards do not keep their output for backward)."""

    def linear_weight(self, module: nn.Module) -> torch.Tensor | None:
        """The weight as [out, in] where the kind's forward is ``x W^T + b`` (the fused path), else None."""

    def delta_rows(self, lora_A: torch.Tensor, lora_B: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        """Rows ``r0:r1`` of ``delta`` in the stored weight's layout (first axis), unscaled."""


def draw_linear_init(lora_A: torch.Tensor, lora_B: torch.Tensor, init: str, rank: int) -> None:
    """A Kaiming-uniform (as ``nn.Linear`` and PEFT draw it) or N(0, 1/r) for ``"gaussian"``; B zero."""
    if init == "gaussian":
        nn.init.normal_(lora_A, std=1.0 / rank)
    else:
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
    lora_B.zero_()


WEIGHT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def floating_weight(module: nn.Module) -> str | None:
    """Why the module's weight cannot take LoRA, or None."""
    if parametrize.is_parametrized(module):
        return ("its weights are computed by torch.nn.utils.parametrize, so merging could not write them; remove "
                "the parametrization first (parametrize.remove_parametrizations)")
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return f"it has no weight tensor ({type(module).__name__}.weight is {type(weight).__name__})"
    if not weight.is_floating_point():
        return f"its weight has dtype {weight.dtype}; LoRA needs a floating-point weight"
    if weight.dtype not in WEIGHT_DTYPES:
        return (f"its weight has dtype {weight.dtype}; LoRA supports float32, float64, float16 and bfloat16 weights "
                "(dequantize the layer first)")
    return None


class LinearKind:
    """``nn.Linear`` and its subclasses: ``y = base(x) + s x A^T B^T``; delta = B A [out, in]."""

    name = "Linear"
    peft_keys = ("lora_A.weight", "lora_B.weight")
    takes_dropout = True
    init_ = staticmethod(draw_linear_init)

    def matches(self, module):
        return isinstance(module, nn.Linear)

    def merges(self, cls):
        return cls.forward is nn.Linear.forward

    def linear_weight(self, module):
        return module.weight

    def check(self, module):
        return floating_weight(module)

    def shapes(self, module, rank):
        return (rank, module.in_features), (module.out_features, rank)

    def rank_axis(self, t):
        return -1 if t.ndim >= 2 else None

    def shrink(self, module, x, lora_A):
        return F.linear(x, lora_A)  # [..., in] -> [..., r]

    def expand(self, module, t, lora_B):
        return F.linear(t, lora_B)  # [..., r] -> [..., out]

    def delta_rows(self, lora_A, lora_B, r0, r1):
        return einops.einsum(lora_B[r0:r1], lora_A, "o r, r i -> o i")


def transformers_conv1d() -> type | None:
    """transformers' ``Conv1D`` if transformers is loaded (a model holding one has imported it), else None."""
    utils = sys.modules.get("transformers.pytorch_utils")
    return getattr(utils, "Conv1D", None)


class Conv1DKind(LinearKind):
    """transformers' ``Conv1D`` (GPT-2): ``y = x W + b`` with W stored [in, out]; delta = (B A)^T [in, out].

    PEFT writes such adapters with ``fan_in_fan_out: true``; A and B are laid out as for Linear.
    """

    name = "Conv1D"

    def matches(self, module):
        conv1d = transformers_conv1d()
        return conv1d is not None and isinstance(module, conv1d)

    def merges(self, cls):
        return cls.forward is transformers_conv1d().forward

    def linear_weight(self, module):
        return module.weight.t()  # [in, out] stored: its transpose is the [out, in] view

    def shapes(self, module, rank):
        features_in, features_out = module.weight.shape
        return (rank, features_in), (features_out, rank)

    def delta_rows(self, lora_A, lora_B, r0, r1):
        return einops.einsum(lora_B, lora_A[:, r0:r1], "o r, r i -> i o")


class EmbeddingKind:
    """``nn.Embedding``: ``y = base(ids) + s A^T[ids] B^T``; delta = (B A)^T [num_embeddings, dim].

    As in PEFT, A starts at zero and B normal, and no dropout applies. ``padding_idx`` and
    ``scale_grad_by_freq`` act on A's gradient as they act on the base's; ``max_norm`` would
    renormalise A in place, so such embeddings are refused.
    """

    name = "Embedding"
    peft_keys = ("lora_embedding_A", "lora_embedding_B")
    takes_dropout = False

    def matches(self, module):
        return isinstance(module, nn.Embedding)

    def merges(self, cls):
        return cls.forward is nn.Embedding.forward

    def linear_weight(self, module):
        return None

    def check(self, module):
        if module.max_norm is not None:
            return (f"it has max_norm={module.max_norm}, which renormalises looked-up rows in place and would "
                    "rewrite the adapter; use an Embedding without max_norm")
        return floating_weight(module)

    def shapes(self, module, rank):
        return (rank, module.num_embeddings), (module.embedding_dim, rank)

    def init_(self, lora_A, lora_B, init, rank):
        lora_A.zero_()
        nn.init.normal_(lora_B)

    def rank_axis(self, t):
        return -1 if t.ndim >= 2 else None

    def shrink(self, module, ids, lora_A):
        return F.embedding(ids, lora_A.t(), module.padding_idx, scale_grad_by_freq=module.scale_grad_by_freq)

    def expand(self, module, t, lora_B):
        return F.linear(t, lora_B)  # [..., r] -> [..., dim]

    def delta_rows(self, lora_A, lora_B, r0, r1):
        return einops.einsum(lora_B, lora_A[:, r0:r1], "d r, r n -> n d")


class ConvKind:
    """``nn.Conv{1,2,3}d`` with ``groups=1``: ``y = base(x) + s conv_B(conv_A(x))``; delta [out, in, *kernel].

    conv_A has A [r, in, *kernel] and the base's stride, padding (and padding mode) and dilation;
    conv_B is a 1x1 convolution with B [out, r, 1, ...]. Their composition is one convolution
    with weight ``einsum(B, A)``, which is what merging adds.
    """

    takes_dropout = True
    peft_keys = ("lora_A.weight", "lora_B.weight")
    init_ = staticmethod(draw_linear_init)

    def __init__(self, dims: int):
        self.dims = dims
        self.module_type = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
        self.name = self.module_type.__name__

    def matches(self, module):
        return isinstance(module, self.module_type)

    def merges(self, cls):
        return cls.forward is self.module_type.forward

    def linear_weight(self, module):
        return None

    def check(self, module):
        if module.groups != 1:
            return f"it has groups={module.groups}; LoRA supports convolutions with groups=1"
        return floating_weight(module)

    def shapes(self, module, rank):
        return (rank, module.in_channels, *module.kernel_size), (module.out_channels, rank, *(1,) * self.dims)

    def rank_axis(self, t):
        return 1 if t.ndim == self.dims + 2 else None  # [B, r, *spatial]; unbatched [r, *spatial] has no rows

    def shrink(self, module, x, lora_A):
        padding = module.padding
        if module.padding_mode != "zeros":  # as the base pads: explicitly, then no padding in the conv
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
            padding = 0
        return self.conv(x, lora_A, None, module.stride, padding, module.dilation)  # [B, r, *spatial]

    def expand(self, module, t, lora_B):
        return self.conv(t, lora_B)  # [B, out, *spatial]

    def delta_rows(self, lora_A, lora_B, r0, r1):
        return einops.einsum(lora_B[r0:r1].flatten(1), lora_A, "o r, r i ... -> o i ...")


LINEAR, CONV1D, EMBEDDING = LinearKind(), Conv1DKind(), EmbeddingKind()
KINDS: tuple[Kind, ...] = (CONV1D, LINEAR, EMBEDDING, ConvKind(1), ConvKind(2), ConvKind(3))  # first match wins
LINEAR_LIKE = (LINEAR, CONV1D)  # what targets=None adapts


def kind_of(module: nn.Module) -> Kind | None:
    """The kind of ``module``, or None when LoRA does not support its type."""
    return next((kind for kind in KINDS if kind.matches(module)), None)


def supported_names() -> str:
    return ", ".join(["nn.Linear (and subclasses)", "transformers Conv1D", "nn.Embedding",
                      "nn.Conv1d/2d/3d (groups=1)"])


def require_kind(name: str, module: nn.Module) -> Kind:
    """The kind of the module at ``name``; raises :class:`PeftliteError` naming the type and the kinds."""
    kind = kind_of(module)
    if kind is None:
        raise PeftliteError(f"module '{name}' is a {type(module).__name__}, which LoRA does not support; supported: "
                            f"{supported_names()}. Narrow targets to those layers.")
    reason = kind.check(module)
    if reason is not None:
        raise PeftliteError(f"module '{name}' ({type(module).__name__}) cannot take LoRA: {reason}.")
    return kind
