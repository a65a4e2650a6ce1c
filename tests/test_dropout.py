"""drop_positions: each element dropped independently with probability p."""

import math

import pytest
import torch

from peftlite.ops.dropout import apply_drop, drop_positions


@pytest.mark.parametrize("p", [0.01, 0.1, 0.5, 0.9])
def test_fraction_and_layout(p):
    n = 200_003
    torch.manual_seed(0)
    positions = drop_positions(n, p)
    assert positions.dtype == torch.int64 and positions.ndim == 1
    assert (positions[1:] > positions[:-1]).all() and positions[0] >= 0 and positions[-1] < n
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(positions.numel() - n * p) < 5 * sigma
    blocks = torch.bincount(positions * 10 // n, minlength=10).double()  # uniform over the range
    assert (blocks - n * p / 10).abs().max() < 5 * math.sqrt(n / 10 * p * (1 - p))


def test_neighbours_are_independent():
    n, p = 400_000, 0.3
    torch.manual_seed(1)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[drop_positions(n, p)] = True
    both = (mask[1:] & mask[:-1]).double().mean().item()
    assert abs(both - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / n)


def test_tiny_sizes_have_the_right_probability():
    torch.manual_seed(2)
    hits = sum(drop_positions(1, 0.25).numel() for _ in range(4000))
    assert abs(hits / 4000 - 0.25) < 5 * math.sqrt(0.25 * 0.75 / 4000)


def test_reproducible_from_the_seed():
    torch.manual_seed(3)
    first = drop_positions(10_000, 0.2)
    torch.manual_seed(3)
    assert torch.equal(first, drop_positions(10_000, 0.2))


def test_apply_drop_zeroes_exactly_those_positions():
    x = torch.arange(1.0, 13.0).view(3, 4)
    out = apply_drop(x, torch.tensor([0, 5, 11]))
    assert out.flatten().tolist() == [0, 2, 3, 4, 5, 0, 7, 8, 9, 10, 11, 0]
    assert x[0, 0] == 1  # a copy


@pytest.mark.parametrize("p", [0.0, 1.0, -0.1])
def test_rejects_degenerate_probabilities(p):
    with pytest.raises(ValueError):
        drop_positions(10, p)
