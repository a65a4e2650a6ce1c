"""Merging a low-rank delta into a weight so that it can be taken out again bit-exactly.

Merging rounds: ``W' = round(W + d)`` loses the low bits of ``W``, so subtracting ``d`` again
(what PEFT does) drifts a little on every merge/unmerge cycle. Here, at merge time we also
compute what an unmerge will give, ``W'' = round(W' - d)``, and keep the per-element
difference between the bit patterns of ``W`` and ``W''`` as one ``int8`` per element. Unmerge
recomputes ``W''`` from the same ``d`` and adds the difference back to its bit pattern, which
gives ``W`` exactly. The rare elements whose difference does not fit in an ``int8`` (where
``|d|`` dwarfs ``|W|`` or the sign flips) are kept sparsely as (flat index, original bits).

Memory while merged: 1 byte per weight element, plus 8 bytes + the element size per exception.
Work is done in blocks of rows, with ``d`` computed block by block (``delta_rows(r0, r1)``), so no
full-size temporary is made. Exactness needs the same ``d`` at unmerge time: the same adapter
values on the same device, computed in the same blocks (matrix products are deterministic for
identical inputs and shapes on one device).
"""

from collections.abc import Callable
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
BLOCK_ELEMENTS = 1 << 16  # per block on CPU: small temporaries that stay in cache and are reused by the allocator
DEVICE_BLOCK_ELEMENTS = 1 << 22  # per block elsewhere: each block costs ~15 kernel launches and one sync

DeltaRows = Callable[[int, int], torch.Tensor]  # (r0, r1) -> delta[r0:r1], float32 (float64 for float64)


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


def row_blocks(weight: torch.Tensor):
    """(r0, r1) spans of rows, about BLOCK_ELEMENTS elements each (DEVICE_BLOCK_ELEMENTS off the CPU);
    the same for the same shape and device."""
    rows = weight.shape[0]
    cols = weight[0].numel() if rows else 1
    elements = BLOCK_ELEMENTS if weight.device.type == "cpu" else DEVICE_BLOCK_ELEMENTS
    step = max(1, elements // max(1, cols))
    return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


def merge_is_finite(weight: torch.Tensor, delta_rows: DeltaRows) -> bool:
    """Whether ``round(weight + delta)`` holds no NaN or Inf. Reads only."""
    finite = [rounded_add(weight[r0:r1], delta_rows(r0, r1)).isfinite().all() for r0, r1 in row_blocks(weight)]
    return bool(torch.stack(finite).all()) if finite else True  # one read back, not one per block


def merge_exact_(weight: torch.Tensor, delta_rows: DeltaRows) -> MergeResidual:
    """Overwrite ``weight`` with ``round(weight + delta)``; return what :func:`unmerge_exact_` needs."""
    bits, wide = _BITS[weight.dtype], _WIDE[_BITS[weight.dtype]]
    residual = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    exc_index, exc_bits = [], []
    row_size = weight[0].numel() if weight.shape[0] else 0
    for r0, r1 in row_blocks(weight):
        block, delta = weight[r0:r1], delta_rows(r0, r1)
        merged = rounded_add(block, delta)
        original = block.view(bits).to(wide, copy=True)  # a copy even where wide == bits (float64)
        recomputed = rounded_add(merged, -delta).view(bits).to(wide)
        diff = original.sub_(recomputed)
        fits = diff.clamp(-128, 127)
        misses = (recomputed.add_(fits) != block.view(bits).to(wide)).flatten().nonzero().flatten()
        residual[r0:r1] = fits.to(torch.int8)
        exc_index.append(misses + r0 * row_size)
        exc_bits.append(block.view(bits).flatten()[misses])
        block.copy_(merged)
    return MergeResidual(residual, torch.cat(exc_index) if exc_index else torch.empty(0, dtype=torch.int64),
                         torch.cat(exc_bits) if exc_bits else torch.empty(0, dtype=bits))


def fingerprint(tensor: torch.Tensor) -> tuple[int, int, int]:
    """A checksum of the tensor's bits: the plain sum of its bit patterns (as integers), and the sums weighted by
    row and by column number. Any edit of values changes it but for contrived ones; ``_version`` counters miss
    ``.data`` edits and dtype round trips, this does not. One pass, in row blocks (no full-size temporary)."""
    if tensor.dtype not in _BITS:
        return (0, 0, 0)
    flat = tensor.detach().reshape(tensor.shape[0] if tensor.ndim else 1, -1)
    total = by_row = by_col = torch.zeros((), dtype=torch.int64, device=tensor.device)
    columns = torch.arange(1, flat.shape[1] + 1, device=tensor.device)
    for r0, r1 in row_blocks(flat):
        bits = flat[r0:r1].view(_BITS[tensor.dtype])
        rows = bits.sum(1, dtype=torch.int64)  # sums wrap in int64: still a checksum
        total = total + rows.sum()
        by_row = by_row + (rows * torch.arange(r0 + 1, r1 + 1, device=tensor.device)).sum()
        by_col = by_col + (bits.sum(0, dtype=torch.int64) * columns).sum()
    return tuple(int(v) for v in torch.stack([total, by_row, by_col]).tolist())


def unmerge_exact_(weight: torch.Tensor, delta_rows: DeltaRows, state: MergeResidual) -> None:
    """Overwrite merged ``weight`` with the weight :func:`merge_exact_` was given, bit for bit."""
    bits, wide = _BITS[weight.dtype], _WIDE[_BITS[weight.dtype]]
    residual = state.residual.to(weight.device)
    for r0, r1 in row_blocks(weight):
        block = weight[r0:r1]
        back = rounded_add(block, -delta_rows(r0, r1)).view(bits).to(wide)
        block.view(bits).copy_(back.add_(residual[r0:r1]))  # the narrowing is exact where it matters
    weight.view(bits).view(-1)[state.exc_index.to(weight.device)] = state.exc_bits.to(weight.device)
