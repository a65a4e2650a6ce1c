"""Per-row adapter choice inside one layer: which adapter each row of a batch uses, and the term it adds.

A batch of B rows reaches a layer either as [B, ...] or flattened to [B*k, ...] (tokens of a
row contiguous, as ``x.flatten(0, 1)`` and ``x.view(-1, d)`` lay them out). :func:`spread` maps a
per-row tensor [B, ...] onto such an input's leading axis, so a layer needs no index lists: the
row choice is computed once per batch (``peftlite.adapter_per_row``) as a mask and a slot per row.

Two ways to compute a layer's per-row LoRA term, both one set of ops whatever the number of adapters:

- stacked (every kind): all L adapters side by side as one rank-R adapter (R = sum of ranks),
  ``expand(where(mask, shrink(x, A_all), 0), B_all)``. Reads each adapter once, computes R columns
  for every token: the choice for few tokens per row (decode).
- gathered (Linear-like kinds): each row's own A and B gathered from a zero-padded stack
  [L + 1, r_max, ...] (slot L is zero: rows without an adapter here) and applied with two batched
  products over [B, tokens, features]: one adapter's work per token, the gather amortized over the
  row's tokens: the choice for many tokens per row (prefill, training).
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import PeftliteError

GATHER_FROM = 4  # tokens per row from which the gathered form runs: the crossover in bench_multi_adapter.py (CPU)


@dataclass(frozen=True)
class RowMix:
    """One layer's share of a per-row batch.

    ``names``: the layer's adapters that some row uses, in column order. ``mask`` bool [B, C]:
    row b uses column c (C = the stacked ranks for LoRA, one per adapter for bottlenecks).
    ``slot`` long [B]: the index in ``names`` of row b's adapter, ``len(names)`` for none.
    ``dropout`` float [B]: each row's dropout probability at this layer, or None if all are 0.
    ``cache``: stacked adapters reused by inference forwards while the parameters are unchanged.
    """

    names: tuple[str, ...]
    mask: torch.Tensor
    slot: torch.Tensor
    dropout: torch.Tensor | None
    cache: dict = field(default_factory=dict, compare=False)


def spread(values: torch.Tensor, t: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """``values`` [B] or [B, C] broadcastable against ``t`` [B*k, ...]: rows repeated k times, C on ``axis``
    (None for [C]: ``t`` has no batch axis, an error)."""
    rows, count = values.shape[0], t.shape[0]
    check_rows(rows, t, values.ndim == 2 and axis is None)
    if count != rows:
        values = values.repeat_interleave(count // rows, dim=0)
    shape = [count] + [1] * (t.ndim - 1)
    if values.ndim == 2:
        shape[axis] = values.shape[1]
    return values.view(shape)


def check_rows(rows: int, t: torch.Tensor, unbatched: bool = False) -> None:
    """Raise unless ``t``'s leading axis holds the ``rows`` rows of a per-row batch: exactly ``rows`` for inputs
    of 3 or more dims ([B, T, d], [B, C, H, W]); ``rows`` times the tokens per row for 2-D ones ([B*T, d],
    flattened row by row). A 3-D input with a multiple of ``rows`` is another batch, not ``rows`` rows."""
    count = t.shape[0] if t.ndim else 0
    if unbatched or t.ndim < 2 or count % rows or (t.ndim > 2 and count != rows):
        raise PeftliteError(f"a per-row batch of {rows} rows (one adapter name per row) reached a layer whose input "
                            f"has shape {tuple(t.shape)}; expected a leading axis of {rows} rows (or, for a 2-D "
                            f"input, {rows} * tokens, flattened row by row). Pass one name per row of the batch.")


def dropout_rows(x: torch.Tensor, probability: torch.Tensor) -> torch.Tensor:
    """Inverted dropout with probability ``probability[b]`` for row b: kept values scaled by 1 / (1 - p)."""
    p = spread(probability.to(x.dtype), x)
    keep = torch.rand_like(x) >= p
    return torch.where(keep, x / (1 - p), 0)


def tokens_per_row(x: torch.Tensor, rows: RowMix) -> int:
    """Positions each row brings to the layer: ``x.numel() / (B * features)``."""
    return x.numel() // (rows.slot.shape[0] * max(x.shape[-1], 1)) if x.ndim >= 2 else 0


def cached(rows: RowMix, key: str, params: list[torch.Tensor], build):
    """``build()``, reused across inference forwards while no parameter in ``params`` has changed (versions);
    rebuilt under autograd (the result must carry gradients) and while compiling (the graph holds it)."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return build()
    versions = tuple(p._version for p in params)
    hit = rows.cache.get(key)
    if hit is None or hit[0] != versions:
        hit = rows.cache[key] = (versions, build())
    return hit[1]


def scaled(lora_B: list, scalings: list, dtype: torch.dtype) -> list:
    return [t.to(dtype) * s for t, s in zip(lora_B, scalings)]


def stacked_term(kind, module, x: torch.Tensor, lora_A: list, lora_B: list, scalings: list, rows: RowMix,
                 dtype: torch.dtype) -> torch.Tensor:
    """``expand(where(mask, shrink(x, A_all), 0), B_all)`` with A's stacked on their first axis and the
    B's (times their scalings) side by side on their second, in ``dtype``."""
    a, b = cached(rows, f"stacked {dtype}", lora_A + lora_B,
                  lambda: (torch.cat([t.to(dtype) for t in lora_A]), torch.cat(scaled(lora_B, scalings, dtype), 1)))
    t = kind.shrink(module, x, a)
    t = torch.where(spread(rows.mask, t, kind.rank_axis(t)), t, 0)
    return kind.expand(module, t, b)


def gathered_term(x: torch.Tensor, lora_A: list, lora_B: list, scalings: list, rows: RowMix) -> torch.Tensor:
    """Each row's own ``scaling x A_b^T B_b^T`` for a Linear-like layer: A [r, in], B [out, r] per adapter."""
    count = rows.slot.shape[0]

    def stack():
        rank = max(t.shape[0] for t in lora_A)
        a = torch.stack([F.pad(t.to(x.dtype), (0, 0, 0, rank - t.shape[0])) for t in lora_A]
                        + [x.new_zeros(rank, lora_A[0].shape[1])])  # [L + 1, r, in]
        b = torch.stack([F.pad(t, (0, rank - t.shape[1])) for t in scaled(lora_B, scalings, x.dtype)]
                        + [x.new_zeros(lora_B[0].shape[0], rank)])  # [L + 1, out, r]
        return a, b

    a, b = cached(rows, f"gathered {x.dtype}", lora_A + lora_B, stack)
    check_rows(count, x)
    tokens = x.reshape(count, -1, x.shape[-1])  # [B, k, in]: both layouts keep a row's tokens together
    t = torch.bmm(tokens, a.index_select(0, rows.slot).transpose(1, 2))  # [B, k, r]
    y = torch.bmm(t, b.index_select(0, rows.slot).transpose(1, 2))  # [B, k, out]
    return y.view(*x.shape[:-1], y.shape[-1])
