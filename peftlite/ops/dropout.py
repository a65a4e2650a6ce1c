"""Dropout as a sorted list of dropped positions instead of a dense mask.

Each element is dropped independently with probability p, so the gaps between consecutive
dropped positions are i.i.d. Geometric(p) on {1, 2, ...}. Drawing those gaps costs about
``p * numel`` random numbers instead of ``numel``, and the result is small enough to keep for
backward (int64 per dropped element) instead of a dropped copy of the input.

A gap is ``floor(log(1 - U) / log(1 - p)) + 1`` with ``U`` uniform on the float32 grid of [0, 1),
so every gap probability matches the geometric law to within 2**-24.
"""

import math

import torch


def drop_positions(numel: int, p: float, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sorted flat indices in ``[0, numel)``, each index present independently with probability ``p``."""
    if not 0 < p < 1:
        raise ValueError(f"drop probability must be in (0, 1), got {p}")
    inv_log_keep = 1.0 / math.log1p(-p)
    chunks, end = [], -1  # `end`: the last position drawn so far
    while end < numel - 1:
        expected = (numel - 1 - end) * p  # drops still to come; draw a few sigma more so one round nearly always does
        count = int(expected + 6 * math.sqrt(expected) + 64)
        uniform = torch.rand(count, device=device, generator=generator)
        gaps = torch.log1p(uniform.neg_()).mul_(inv_log_keep).floor_().to(torch.int64).add_(1)
        positions = gaps.cumsum_(0).add_(end)
        end = positions[-1].item()
        chunks.append(positions)
    if not chunks:  # numel == 0
        return torch.empty(0, dtype=torch.int64, device=device)
    positions = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
    return positions[: torch.searchsorted(positions, numel)]


def apply_drop(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A copy of contiguous ``x`` with the flat ``positions`` set to zero (no 1/(1-p) scaling)."""
    out = x.clone()
    out.view(-1).index_fill_(0, positions, 0)
    return out
