"""Merging a low-rank delta into a weight so that it can be taken out again bit-exactly.

Merging rounds: ``W' = round(W + d)`` loses the low bits of ``W``, so subtracting ``d`` again
(what PEFT does) drifts a little on every merge/unmerge cycle. Here, at merge time we also
compute what an unmerge would give, ``W'' = round(W' - d)``, and keep the per-element
difference between the bit patterns of ``W`` and ``W''`` as one ``int8`` per element. Unmerge
recomputes ``W''`` from the same ``d`` and adds the difference back to its bit pattern, which
gives ``W`` exactly. The rare elements whose difference does not fit in an ``int8`` (where
``|d|`` dwarfs ``|W|`` or the sign flips) are kept sparsely as (flat index, original bits).

Memory while merged: 1 byte per weight element, plus 8 bytes + the element size per exception.
Exactness needs the same ``d`` at unmerge time: the same adapter values on the same device
(``LoRALinear`` checks the first; matrix products on one device are deterministic for the same
inputs).
"""

from dataclasses import dataclass

import torch

_BITS = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}
# Integer type wide enough to subtract two bit patterns of each float type without overflow
# (float64 wraps around, which the equality check below still handles correctly).
_WIDE = {torch.int64: torch.int64, torch.int32: torch.int64, torch.int16: torch.int32}


@dataclass
class MergeResidual:
    """What an exact unmerge needs besides the merged weight and the delta.

    residual:   int8, weight's shape. bits(W) - bits(round(W' - d)) where that fits.
    exc_index:  int64 [E]. Flat indices of the elements where it does not fit.
    exc_bits:   [E], the bit-pattern integer type. Original bits at those indices.
    """

    residual: torch.Tensor
    exc_index: torch.Tensor
    exc_bits: torch.Tensor

    def nbytes(self) -> int:
        """Bytes this state holds: the memory cost of keeping a layer merged."""
        return sum(t.numel() * t.element_size() for t in (self.residual, self.exc_index, self.exc_bits))


def rounded_add(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``round_to(weight.dtype)(weight + delta)``, rounding once.

    A float32 or float64 sum is IEEE-rounded once. For bfloat16/float16 weights the sum is
    formed in float64, where adding two float32-representable values is exact but for
    extreme exponent gaps, and then rounded once to the weight's dtype.
    """
    if weight.dtype in (torch.float32, torch.float64):
        return weight + delta.to(weight.dtype)
    return (weight.double() + delta.double()).to(weight.dtype)


def merge_exact(weight: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, MergeResidual]:
    """Return ``(round(weight + delta), residual)``; :func:`unmerge_exact` inverts it exactly."""
    merged = rounded_add(weight, delta)
    back = rounded_add(merged, -delta)
    bits, wide = _BITS[weight.dtype], _WIDE[_BITS[weight.dtype]]
    original = weight.view(bits).to(wide)
    recomputed = back.view(bits).to(wide)
    residual = (original - recomputed).clamp_(-128, 127).to(torch.int8)
    misses = (recomputed + residual.to(wide)) != original
    exc_index = misses.flatten().nonzero().flatten()
    exc_bits = weight.view(bits).flatten()[exc_index].clone()
    return merged, MergeResidual(residual, exc_index, exc_bits)


def unmerge_exact(merged: torch.Tensor, delta: torch.Tensor, state: MergeResidual) -> torch.Tensor:
    """Return the weight that :func:`merge_exact` was given, bit for bit."""
    back = rounded_add(merged, -delta)
    bits, wide = _BITS[merged.dtype], _WIDE[_BITS[merged.dtype]]
    device = merged.device
    restored = (back.view(bits).to(wide) + state.residual.to(device, wide)).to(bits)
    restored.view(-1)[state.exc_index.to(device)] = state.exc_bits.to(device)
    return restored.view(merged.dtype)
