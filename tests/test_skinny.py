"""transposed_product: a^T b summed over row blocks equals one product, within fp32 rounding."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peftlite.ops.skinny import blocks, transposed_product
from tests.models import assert_within_rounding, num_threads


def check(rows, rank, cols, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(rows, rank, generator=g), torch.randn(rows, cols, generator=g)
    expected = a.double().t() @ b.double()
    magnitude = a.double().abs().t() @ b.double().abs()
    assert_within_rounding(transposed_product(a, b), expected, magnitude, torch.float32)


@pytest.mark.parametrize("count, rows, rank, dtype, device, expected", [
    (2, 2048, 16, torch.float32, "cpu", 2),  # one block per thread
    (2, 8192 * 8, 16, torch.float32, "cpu", 2),
    (3, 1000, 16, torch.float32, "cpu", 3),
    (2, 512, 1, torch.float32, "cpu", 2),
    (2, 511, 16, torch.float32, "cpu", 1),  # blocks under 256 rows: plain mm
    (3, 767, 16, torch.float32, "cpu", 1),
    (1, 2048, 16, torch.float32, "cpu", 1),
    (2, 2048, 128, torch.float32, "cpu", 2),
    (2, 2048, 129, torch.float32, "cpu", 1),
    (2, 2048, 16, torch.float64, "cpu", 1),
    (2, 2048, 16, torch.bfloat16, "cpu", 1),
    (2, 2048, 16, torch.float32, "meta", 1),
])
def test_block_count_rule(count, rows, rank, dtype, device, expected):
    with num_threads(count):
        assert blocks(rows, rank, torch.empty(0, dtype=dtype, device=device)) == expected


@pytest.mark.parametrize("count, rows", [(2, 2048), (2, 1000), (3, 1000), (3, 769), (2, 8192 * 4 + 5)])
def test_blocked_sum_matches_float64(count, rows):
    with num_threads(count):
        assert blocks(rows, 16, torch.empty(0)) >= 2  # the blocked path, not mm
        check(rows, 16, 33)


@pytest.mark.parametrize("count", [2, 3, 5, 64, 1003, 2000])
def test_any_block_count_matches_float64(count):
    g = torch.Generator().manual_seed(count)
    a, b = torch.randn(1003, 7, generator=g), torch.randn(1003, 33, generator=g)
    magnitude = a.double().abs().t() @ b.double().abs()
    assert_within_rounding(transposed_product(a, b, count), a.double().t() @ b.double(), magnitude, torch.float32)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(0, 1600), rank=st.integers(1, 40), cols=st.integers(1, 40), count=st.integers(1, 3),
       seed=st.integers(0, 2**31 - 1))
def test_any_shape_matches_float64(rows, rank, cols, count, seed):
    with num_threads(count):
        check(rows, rank, cols, seed)
