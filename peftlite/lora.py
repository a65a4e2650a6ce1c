"""LoRALinear: low-rank adaptation of a held ``nn.Linear`` (Hu et al. 2021, arXiv 2106.09685)."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .errors import PeftliteError
from . import exact_merge
from .exact_merge import MergeResidual
from .ops.backend import lora_linear

INITS = ("default", "gaussian")


def check_lora_options(rank, alpha, dropout, init) -> None:
    """Raise :class:`PeftliteError` unless the LoRA hyper-parameters are usable."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise PeftliteError(f"rank={rank!r}: expected an integer >= 1 (typical: 4 to 64). Pass e.g. rank=8.")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0):
        raise PeftliteError(
            f"alpha={alpha!r}: expected a number > 0, or None for alpha = rank. "
            "scaling is alpha / rank, so e.g. alpha=16 with rank=8 doubles the update."
        )
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise PeftliteError(f"dropout={dropout!r}: expected a probability in [0, 1). Pass e.g. dropout=0.05, or 0.")
    if init not in INITS:
        raise PeftliteError(f"init={init!r}: expected one of {', '.join(map(repr, INITS))}.")


def lora_scaling(rank: int, alpha: float, rslora: bool) -> float:
    """``alpha / rank``, or ``alpha / sqrt(rank)`` for rank-stabilized LoRA (Kalajdzievski 2023)."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


class LoRALinear(nn.Module):
    """An ``nn.Linear`` plus a trainable low-rank update; the base weight stays frozen.

    ``y = x W^T + b + scaling * (dropout(x) A^T) B^T``

    x: [..., in]    W: [out, in] (frozen, the base layer's own Parameter, not a copy)
    A: [rank, in]   B: [out, rank]   scaling = alpha / rank (alpha / sqrt(rank) with rslora)

    State-dict keys: the base's ``weight`` and ``bias`` keep their names; ``lora_A`` and
    ``lora_B`` are added. ``init="default"`` draws A Kaiming-uniform and zeros B, so the layer
    starts equal to the base; ``init="gaussian"`` draws A from N(0, std=1/rank).

    >>> layer = LoRALinear(nn.Linear(16, 4), rank=2)
    >>> layer(torch.randn(3, 5, 16)).shape
    torch.Size([3, 5, 4])
    """

    def __init__(self, base: nn.Linear, rank: int = 8, alpha=None, dropout: float = 0.0, rslora: bool = False,
                 init: str = "default"):
        super().__init__()
        check_base(base)
        check_lora_options(rank, alpha, dropout, init)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.rslora = bool(rslora)
        self.scaling = lora_scaling(rank, self.alpha, self.rslora)
        self.dropout = float(dropout)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        self.merged = False
        self._residual: MergeResidual | None = None
        self._merged_key = None
        self.reset_lora(init)

    def reset_lora(self, init: str = "default") -> None:
        """Redraw ``lora_A`` and zero ``lora_B``: the layer equals its base again (if unmerged)."""
        if self.merged:
            raise PeftliteError("reset_lora() on a merged layer would lose the merged update; unmerge() first.")
        check_lora_options(self.rank, self.alpha, self.dropout, init)
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(self.lora_A, std=1.0 / self.rank)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.lora_B.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            self._refuse_training_while_merged()
            return F.linear(x, self.weight, self.bias)
        dropout = self.dropout if self.training else 0.0
        weight, bias, lora_A, lora_B = self.weight, self.bias, self.lora_A, self.lora_B
        device = x.device.type
        if torch.is_autocast_enabled(device):  # a custom Function is not autocast: cast as F.linear would
            dtype = torch.get_autocast_dtype(device)
            with torch.autocast(device, enabled=False):
                return lora_linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype),
                                   lora_A.to(dtype), lora_B.to(dtype), self.scaling, dropout)
        return lora_linear(x, weight, bias, lora_A, lora_B, self.scaling, dropout)

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` as a new [out, in] tensor, in float32 (float64 for float64 layers)."""
        return self._delta_rows(0, self.out_features)

    def _delta_rows(self, r0: int, r1: int) -> torch.Tensor:
        """Rows ``r0:r1`` of :meth:`delta_weight`: ``scaling * B[r0:r1] @ A``."""
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        with torch.no_grad():
            return torch.mm(self.lora_B[r0:r1].to(dtype), self.lora_A.to(dtype)).mul_(self.scaling)

    def merge(self) -> None:
        """Fold the update into ``weight`` in place: ``W <- round(W + scaling * B A)``. Idempotent.

        Afterwards a forward costs one plain linear. Raises :class:`PeftliteError` (weight
        unchanged) if the merged weight would hold NaN or Inf.
        """
        if self.merged:
            return
        if not self.merge_is_finite():
            raise PeftliteError(
                f"merging this layer ({self.out_features}x{self.in_features}, rank {self.rank}) gives NaN or Inf "
                "weights; nothing was changed. Check lora_A/lora_B for NaN/Inf or overflow in the weight's dtype."
            )
        self.commit_merge()

    def merge_is_finite(self) -> bool:
        """Whether :meth:`merge` would give a weight free of NaN and Inf (checks, changes nothing)."""
        return exact_merge.merge_is_finite(self.weight.detach(), self._delta_rows)

    def commit_merge(self) -> None:
        """Merge without the finiteness check; ``merge(model)`` checks every layer first, then commits."""
        with torch.no_grad():
            self._residual = exact_merge.merge_exact_(self.weight.detach(), self._delta_rows)
        self._merged_key = self._merge_key()
        self.merged = True

    def unmerge(self) -> None:
        """Take the update out of ``weight`` again, restoring it bit-exactly. Idempotent."""
        if not self.merged:
            return
        if not self.exactly_unmergeable():
            raise PeftliteError(
                "the weight or lora_A/lora_B were modified, or the layer was moved to another dtype or device, while "
                "it was merged, so unmerge() can no longer recover the original weight exactly. Reload the base "
                "weights (and the adapter) instead; to change or move an adapter, unmerge first."
            )
        with torch.no_grad():
            exact_merge.unmerge_exact_(self.weight.detach(), self._delta_rows, self._residual)
        self._residual = None
        self.merged = False

    def exactly_unmergeable(self) -> bool:
        """False if the weight, adapter, dtype or device changed since :meth:`merge` (meaningful while merged)."""
        return self._merge_key() == self._merged_key

    def _merge_key(self) -> tuple:
        """What must not change between merge and unmerge for the exact inverse to hold."""
        return (self.weight._version, self.lora_A._version, self.lora_B._version, self.weight.dtype,
                self.weight.device, self.lora_A.dtype, self.lora_A.device)

    def merge_state_bytes(self) -> int:
        """Bytes held to make :meth:`unmerge` exact (0 while unmerged)."""
        return 0 if self._residual is None else self._residual.nbytes()

    def _refuse_training_while_merged(self) -> None:
        adapter_trains = self.lora_A.requires_grad or self.lora_B.requires_grad
        if self.training and adapter_trains and torch.is_grad_enabled():
            raise PeftliteError(
                "forward in training mode on a merged LoRA layer: the adapter would get no gradient. "
                "Call peftlite.unmerge(model) before training, or model.eval() / torch.no_grad() for inference."
            )

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"rank={self.rank}, alpha={self.alpha:g}, scaling={self.scaling:g}, dropout={self.dropout:g}, "
                f"rslora={self.rslora}, merged={self.merged}")


def check_base(base) -> None:
    """Raise :class:`PeftliteError` unless ``base`` is an ``nn.Linear`` with a floating weight."""
    if isinstance(base, LoRALinear):
        raise PeftliteError("this layer already has LoRA; call peftlite.unload() first to replace it with a new one.")
    if not isinstance(base, nn.Linear):
        raise PeftliteError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}. Target the Linear layers.")
    if not base.weight.is_floating_point():
        raise PeftliteError(f"the Linear's weight has dtype {base.weight.dtype}; LoRA needs a floating-point weight.")
