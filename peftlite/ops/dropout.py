"""Dropout as a sorted list of dropped positions, drawn from a seed, instead of a dense mask.

Each element is dropped independently with probability p, so the gaps between consecutive
dropped positions are i.i.d. Geometric(p) on {1, 2, ...}. Drawing those gaps costs about
``p * numel`` random numbers instead of ``numel``, and the positions are a function of one seed,
so forward and backward draw them again instead of keeping a mask or a dropped copy of the input.

A gap is ``floor(log(1 - U) / log(1 - p)) + 1`` with ``U`` uniform on the float32 grid of [0, 1),
so every gap probability matches the geometric law to within 2**-24. ``U`` comes from a
counter-based generator (SplitMix64: the i-th number is a fixed mixing function of
``seed + i * golden``), computed with vectorised integer ops on the tensors' own device: the
same seed gives the same positions on every device, with no generator state to carry.

Training uses :func:`drop_positions_padded`: one draw of a fixed length, padded with a spare
position, so nothing is read back to the host (no device sync on a GPU); :func:`drop_positions`
(the exact list) defines the same set and serves the reference path and tests.

The seed is an int64 scalar tensor on the CPU, drawn from torch's global CPU generator by
:func:`draw_seed` (no device sync); activation checkpointing restores that generator's state
before recomputing, so a recomputed forward draws the same mask.
"""

import math
import sys

import torch

GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)  # SplitMix64 constants, as signed int64
MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
MIX2 = 0x94D049BB133111EB - (1 << 64)
NO_SEED = torch.zeros((), dtype=torch.int64)
LITTLE_ENDIAN = sys.byteorder == "little"  # int64 -> (low, high) int32 halves
UNIT = 2.0**-24  # one step of the float32 grid the uniforms live on; -UNIT draws them negated


def logical_shift(z: torch.Tensor, bits: int, out: torch.Tensor = None) -> torch.Tensor:
    """``z >>> bits``: ``z >> bits`` on the 64-bit pattern (int64 ``>>`` sign-extends), into ``out`` if given."""
    shifted = torch.bitwise_right_shift(z, bits) if out is None else torch.bitwise_right_shift(z, bits, out=out)
    return shifted.bitwise_and_((1 << (64 - bits)) - 1)


def hash_uniform(z: torch.Tensor, scratch: torch.Tensor, seed: int, first: int, scale: float = UNIT) -> torch.Tensor:
    """Numbers ``2 * first .. 2 * (first + H) - 1`` of stream ``seed``, ``scale * h`` for 24-bit integers ``h``:
    uniform on the float32 grid of [0, 1) with the default ``UNIT``, negated with ``-UNIT`` (exact),
    computed in ``z``'s storage: returns a float32 view of ``z`` [2H].

    ``z`` and ``scratch`` are int64 [H] and do not overlap; ``scratch`` is overwritten. Hash ``j``
    gives numbers ``2j`` and ``2j + 1``: the top 24 bits of its low and of its high 32-bit half.
    Every step is in place: fresh tensors per step (and the page faults of each new buffer) cost
    more than the arithmetic.
    """
    counters = torch.arange(first, first + z.numel(), out=z)
    torch.add(torch.tensor(seed, dtype=torch.int64), counters, alpha=GOLDEN, out=z)  # seed + j golden (a CPU scalar)
    for bits, mix in ((30, MIX1), (27, MIX2), (31, None)):  # z ^= z >>> bits; z *= mix (the products wrap)
        z.bitwise_xor_(logical_shift(z, bits, out=scratch))
        if mix is not None:
            z.mul_(mix)
    if not LITTLE_ENDIAN:  # swap the halves, so the int32 view reads (low, high)
        high = logical_shift(z, 32, out=scratch)
        z.bitwise_left_shift_(32).bitwise_or_(high)
    halves = z.view(torch.int32).bitwise_right_shift_(8).bitwise_and_(0xFFFFFF)  # [2H], each below 2**24
    numbers = z.view(torch.float32)
    return numbers.copy_(halves).mul_(scale)  # element i read, then written in place: same bytes


def uniform(seed: int, start: int, count: int, device=None, scale: float = UNIT) -> torch.Tensor:
    """Numbers ``start .. start + count - 1`` of stream ``seed``, uniform on the float32 grid of [0, 1)
    (negated with ``scale=-UNIT``, as in :func:`hash_uniform`)."""
    first = start // 2
    z, scratch = torch.empty(2, (start + count + 1) // 2 - first, dtype=torch.int64, device=device)
    skip = start - 2 * first
    return hash_uniform(z, scratch, seed, first, scale)[skip: skip + count]


def steps_(negated: torch.Tensor, p: float) -> torch.Tensor:
    """Negated uniforms ``-U`` -> ``floor(log(1 - U) / log(1 - p)) + 1``, 1 + Geometric(p), in place (float32).

    The uniforms come negated (:func:`hash_uniform`'s ``scale``) so no pass is spent on ``1 - U``.
    """
    return negated.log1p_().mul_(1.0 / math.log1p(-p)).floor_().add_(1)


def steps(seed: int, start: int, count: int, p: float, device=None) -> torch.Tensor:
    """Distances ``1 + Geometric(p)`` from one dropped position to the next, int64: numbers ``start ..
    start + count - 1`` of stream ``seed``, each ``floor(log(1 - U) / log(1 - p)) + 1``."""
    return steps_(uniform(seed, start, count, device, scale=-UNIT), p).to(torch.int64)


def drop_positions(numel: int, p: float, seed: int, device=None) -> torch.Tensor:
    """Sorted flat indices in ``[0, numel)``, each present independently with probability ``p``."""
    if not 0 < p < 1:
        raise ValueError(f"drop probability must be in (0, 1), got {p}")
    chunks, end, drawn = [], -1, 0  # `end`: the last position drawn so far; `drawn`: numbers used
    while end < numel - 1:
        expected = (numel - 1 - end) * p  # drops still to come; draw a few sigma more so one round nearly always does
        count = int(expected + 6 * math.sqrt(expected) + 64)
        positions = steps(seed, drawn, count, p, device).cumsum_(0).add_(end)
        drawn += count
        end = positions[-1].item()
        chunks.append(positions)
    if not chunks:  # numel == 0
        return torch.empty(0, dtype=torch.int64, device=device)
    positions = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
    return positions[: torch.searchsorted(positions, numel)]


def draw_count(numel: int, p: float) -> int:
    """How many gaps :func:`drop_positions_padded` draws: enough to pass position ``numel`` except with
    probability below 1e-30 (the number of drops is Binomial(numel, p); mean + 12 sigma + 64, Chernoff)."""
    mean = numel * p
    return int(mean + 12 * math.sqrt(mean) + 64)


def drop_positions_padded(numel: int, p: float, seed: int, device=None) -> torch.Tensor:
    """:func:`drop_positions` without reading anything back to the host: no device sync on a GPU.

    Returns :func:`draw_count` positions: the dropped ones (the same as ``drop_positions``: the
    same gaps of the same stream), then ``numel`` for the rest. Zero them in a buffer with one
    spare element past the end (:func:`spare_slot`). Whether the draw reached the end is checked
    on the device (``torch._assert_async``), so a short draw raises instead of dropping too little.
    """
    if not 0 < p < 1:
        raise ValueError(f"drop probability must be in (0, 1), got {p}")
    count = draw_count(numel, p)
    hashes = (count + 1) // 2
    buffer = torch.empty(count + hashes, dtype=torch.int64, device=device)  # one buffer: [positions | hashes]
    positions = buffer[:count]
    negated = hash_uniform(buffer[count:], buffer[:hashes], seed, 0, -UNIT)[:count]  # first half: scratch
    positions.copy_(steps_(negated, p))
    positions[:1].sub_(1)  # then position i = steps 0..i, less 1
    positions.cumsum_(0)
    torch._assert_async(positions[-1] >= numel - 1)
    return positions.clamp_(max=numel)


def spare_slot(rows: int, cols: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(matrix, flat)``: a new [rows, cols] tensor and its storage as a flat tensor one element longer.

    ``flat.index_fill_(0, drop_positions_padded(...), 0)`` zeroes the matrix's dropped elements;
    the padding positions land on the spare element. ``matrix`` shares the storage but is not a
    view (``set_``, not slicing): it may be returned from an autograd Function and then modified
    in place by the caller.
    """
    flat = like.new_empty(rows * cols + 1)
    return like.new_empty(0).set_(flat.untyped_storage(), 0, (rows, cols), (cols, 1)), flat


def draw_seed(p: float) -> torch.Tensor:
    """A fresh seed from the global CPU generator (no device sync), or a constant when ``p`` is 0."""
    return torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64) if p else NO_SEED


def drop_positions_from_seed(numel: int, p: float, seed: torch.Tensor, device=None) -> torch.Tensor:
    """:func:`drop_positions` for a seed held in a CPU int64 scalar tensor."""
    return drop_positions(numel, p, int(seed), device)
