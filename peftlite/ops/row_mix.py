"""Per-row adapter choice inside one layer: which adapter columns each row of a batch uses.

A batch of B rows reaches a layer either as [B, ...] or flattened to [B*k, ...] (tokens of a
row contiguous, as ``x.flatten(0, 1)`` and ``x.view(-1, d)`` lay them out). :func:`spread` maps a
per-row tensor [B, ...] onto such an input's leading axis, so a layer needs no index lists: the
row choice is a mask, computed once per batch, and the layer's stacked adapters run as one product.
"""

from dataclasses import dataclass

import torch

from ..errors import PeftliteError


@dataclass(frozen=True)
class RowMix:
    """One layer's share of a per-row batch.

    ``names``: the layer's adapters that some row uses, in column order. ``mask`` bool [B, C]:
    row b uses column c (C = the stacked ranks for LoRA, one per adapter for bottlenecks).
    ``dropout`` float [B]: each row's dropout probability at this layer, or None if all are 0.
    """

    names: tuple[str, ...]
    mask: torch.Tensor
    dropout: torch.Tensor | None


def spread(values: torch.Tensor, t: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """``values`` [B] or [B, C] broadcastable against ``t`` [B*k, ...]: rows repeated k times, C on ``axis``
    (None for [C]: ``t`` has no batch axis, an error)."""
    rows, count = values.shape[0], t.shape[0]
    if t.ndim < 2 or count % rows or (values.ndim == 2 and axis is None):
        raise PeftliteError(f"a per-row batch of {rows} rows reached a layer whose input has shape {tuple(t.shape)}; "
                            f"expected a leading axis of {rows} rows (or {rows} * tokens, flattened row by row). "
                            "Layers that see the batch elsewhere (sequence-first layouts) cannot mix adapters by row.")
    if count != rows:
        values = values.repeat_interleave(count // rows, dim=0)
    shape = [count] + [1] * (t.ndim - 1)
    if values.ndim == 2:
        shape[axis] = values.shape[1]
    return values.view(shape)


def dropout_rows(x: torch.Tensor, probability: torch.Tensor) -> torch.Tensor:
    """Inverted dropout with probability ``probability[b]`` for row b: kept values scaled by 1 / (1 - p)."""
    p = spread(probability.to(x.dtype), x)
    keep = torch.rand_like(x) >= p
    return torch.where(keep, x / (1 - p), 0)
