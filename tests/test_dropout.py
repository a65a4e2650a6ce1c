"""drop_positions: each element dropped independently with probability p."""

import math

import pytest
import torch

from peftlite.ops.dropout import draw_seed, drop_positions, drop_positions_from_seed


@pytest.mark.parametrize("p", [0.01, 0.1, 0.5, 0.9])
def test_fraction_and_layout(p):
    n = 200_003
    positions = drop_positions(n, p, seed=11)
    assert positions.dtype == torch.int64 and positions.ndim == 1
    assert (positions[1:] > positions[:-1]).all() and positions[0] >= 0 and positions[-1] < n
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(positions.numel() - n * p) < 5 * sigma
    blocks = torch.bincount(positions * 10 // n, minlength=10).double()  # uniform over the range
    assert (blocks - n * p / 10).abs().max() < 5 * math.sqrt(n / 10 * p * (1 - p))


def test_neighbours_are_independent():
    n, p = 400_000, 0.3
    mask = torch.zeros(n, dtype=torch.bool)
    mask[drop_positions(n, p, seed=-5)] = True
    both = (mask[1:] & mask[:-1]).double().mean().item()
    assert abs(both - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / n)


def test_tiny_sizes_have_the_right_probability():
    hits = sum(drop_positions(1, 0.25, seed=seed).numel() for seed in range(4000))
    assert abs(hits / 4000 - 0.25) < 5 * math.sqrt(0.25 * 0.75 / 4000)


def test_positions_are_a_function_of_the_seed_alone():
    seed = draw_seed(0.3)
    assert seed.device.type == "cpu" and seed.dtype == torch.int64
    first = drop_positions_from_seed(5_000, 0.3, seed)
    torch.rand(100)  # the global generator moving on does not matter
    assert torch.equal(first, drop_positions_from_seed(5_000, 0.3, seed))
    assert not torch.equal(first, drop_positions_from_seed(5_000, 0.3, seed + 1))
    assert abs(first.numel() / 5_000 - 0.3) < 5 * math.sqrt(0.3 * 0.7 / 5_000)


def test_uniform_stream_is_uniform_and_continues_across_chunks():
    from peftlite.ops.dropout import uniform

    u = uniform(123, 0, 100_000)
    assert u.dtype == torch.float32 and 0 <= u.min() and u.max() < 1
    assert torch.equal(uniform(123, 40_000, 10), u[40_000:40_010])  # counter-based: any slice alone
    counts = torch.histc(u, bins=16, min=0, max=1)
    assert (counts - 100_000 / 16).abs().max() < 5 * math.sqrt(100_000 / 16)
    assert abs(torch.corrcoef(torch.stack([u[1:], u[:-1]]))[0, 1].item()) < 0.02


@pytest.mark.parametrize("p", [0.0, 1.0, -0.1])
def test_rejects_degenerate_probabilities(p):
    with pytest.raises(ValueError):
        drop_positions(10, p, seed=0)


def splitmix64(seed: int, j: int) -> int:
    """The j-th SplitMix64 output for ``seed``, in plain Python integers (the definition)."""
    mask = (1 << 64) - 1
    z = (seed + j * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


@pytest.mark.parametrize("seed", [0, 123, -(2**63), 2**63 - 1, -7])
def test_uniform_is_splitmix64(seed):
    from peftlite.ops.dropout import uniform

    start, count = 5, 9  # odd start: the first number is the second half of hash 2
    expected = []
    for j in range(start // 2, (start + count + 1) // 2):
        z = splitmix64(seed % (1 << 64), j)
        expected += [((z & 0xFFFFFFFF) >> 8) * 2.0**-24, (z >> 40) * 2.0**-24]  # low half's top 24 bits, high's
    expected = expected[start % 2: start % 2 + count]
    assert uniform(seed, start, count).tolist() == expected


@pytest.mark.parametrize("numel, p, seed", [(0, 0.3, 1), (1, 0.25, 3), (10, 0.5, 1), (200_003, 0.9, 11),
                                            (2048 * 1024, 0.1, 7), (5, 0.01, 2)])
def test_padded_positions_are_the_exact_ones_then_the_spare_slot(numel, p, seed):
    from peftlite.ops.dropout import draw_count, drop_positions_padded

    exact = drop_positions(numel, p, seed)
    padded = drop_positions_padded(numel, p, seed)
    assert padded.numel() == draw_count(numel, p)
    assert torch.equal(padded[: exact.numel()], exact)
    assert (padded[exact.numel():] == numel).all()


def test_a_short_padded_draw_raises_instead_of_dropping_too_little(monkeypatch):
    from peftlite.ops import dropout

    monkeypatch.setattr(dropout, "draw_count", lambda numel, p: 3)
    with pytest.raises(RuntimeError):
        dropout.drop_positions_padded(10_000, 0.5, 1)


def test_spare_slot_takes_the_padding():
    from peftlite.ops.dropout import drop_positions_padded, spare_slot

    matrix, flat = spare_slot(3, 4, torch.empty(0))
    matrix.fill_(1.0)
    flat.index_fill_(0, drop_positions_padded(12, 0.5, 9), 0)
    expected = torch.ones(12)
    expected[drop_positions(12, 0.5, 9)] = 0
    assert torch.equal(matrix.flatten(), expected)


def test_big_endian_halves_are_swapped_into_low_high_order(monkeypatch):
    from peftlite.ops import dropout

    native = dropout.uniform(99, 0, 64)
    monkeypatch.setattr(dropout, "LITTLE_ENDIAN", not dropout.LITTLE_ENDIAN)  # the other byte order's branch
    swapped = dropout.uniform(99, 0, 64)
    assert torch.equal(swapped.view(-1, 2).flip(1).flatten(), native)
