"""merge_exact / unmerge_exact: single rounding on merge, bit-exact inverse, one byte per element."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peftlite.ops.exact_merge import _BITS, merge_exact_, merge_is_finite, rounded_add, unmerge_exact_
from tests.models import DTYPES


def bits(t):
    return t.view(_BITS[t.dtype])


def merge_exact(weight, delta):
    """Out-of-place wrapper for the tests: (merged copy, state)."""
    merged = weight.clone()
    return merged, merge_exact_(merged, lambda r0, r1: delta[r0:r1])


def unmerge_exact(merged, delta, state):
    restored = merged.clone()
    unmerge_exact_(restored, lambda r0, r1: delta[r0:r1], state)
    return restored


def hard_weights(dtype, n=4096, seed=0):
    """Ordinary values plus the awkward ones: zeros of both signs, subnormals, tiny and huge magnitudes."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=g, dtype=torch.float64) * 0.02
    w[:8] = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-8, -1e-8, 100.0, -100.0], dtype=torch.float64)
    w[8:16] = torch.finfo(dtype).tiny / 4  # subnormal in the weight's dtype
    return w.to(dtype).view(64, -1)


@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,))
@pytest.mark.parametrize("delta_scale", [1e-6, 1e-3, 1.0, 50.0])
def test_unmerge_restores_every_bit(dtype, delta_scale):
    weight = hard_weights(dtype)
    delta = torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)) * delta_scale
    delta = delta.to(torch.promote_types(dtype, torch.float32))
    merged, state = merge_exact(weight, delta)
    assert merged.dtype == dtype and torch.isfinite(merged).all()
    assert torch.equal(bits(merged), bits(rounded_add(weight, delta)))
    restored = unmerge_exact(merged, delta, state)
    assert torch.equal(bits(restored), bits(weight))
    assert state.residual.dtype == torch.int8 and state.residual.shape == weight.shape


@pytest.mark.parametrize("dtype", DTYPES)
def test_typical_weights_need_about_one_byte_per_element(dtype):
    weight = (torch.randn(256, 256, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)
    delta = torch.randn(256, 256, generator=torch.Generator().manual_seed(1)) * 1e-3
    _, state = merge_exact(weight, delta)
    assert state.nbytes() <= 1.05 * weight.numel()


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_rounds_once(dtype):
    weight = hard_weights(dtype)
    delta = torch.randn(weight.shape, generator=torch.Generator().manual_seed(2)) * 1e-2
    exact = weight.double() + delta.double()  # exact: both are float32-representable and close in scale
    assert torch.equal(bits(rounded_add(weight, delta)), bits(exact.to(dtype)))


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1),
       weight_scale=st.floats(1e-6, 10.0), delta_scale=st.floats(1e-7, 10.0), cycles=st.integers(1, 5))
def test_repeated_cycles_are_exact(dtype, seed, weight_scale, delta_scale, cycles):
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(17, 31, generator=g) * weight_scale).to(dtype)
    delta = torch.randn(17, 31, generator=g) * delta_scale
    current = weight
    for _ in range(cycles):
        merged, state = merge_exact(current, delta)
        current = unmerge_exact(merged, delta, state)
    assert torch.equal(bits(current), bits(weight))


def test_blocks_cover_tall_and_wide_weights(monkeypatch):
    monkeypatch.setattr("peftlite.ops.exact_merge.BLOCK_ELEMENTS", 64)  # many blocks, and rows wider than a block
    for shape in [(37, 5), (3, 100), (1, 1)]:
        weight = torch.randn(shape).mul(0.02).to(torch.bfloat16)
        delta = torch.randn(shape) * 50
        merged, state = merge_exact(weight, delta)
        assert torch.equal(bits(merged), bits(rounded_add(weight, delta)))
        if weight.numel() > 1:
            assert state.exc_index.numel() > 1  # |d| >> |W|: exceptions, in several blocks
        assert torch.equal(bits(unmerge_exact(merged, delta, state)), bits(weight))


def test_finiteness_check_reads_only():
    weight = torch.ones(4, 4, dtype=torch.float16)
    delta = torch.zeros(4, 4)
    delta[3, 3] = 1e6  # overflows float16
    assert not merge_is_finite(weight, lambda r0, r1: delta[r0:r1])
    assert torch.equal(weight, torch.ones(4, 4, dtype=torch.float16))


def test_blocks_are_larger_off_the_cpu():
    """Off the CPU each block costs kernel launches and one read back: 4 blocks for a 4096^2 weight, not 256."""
    from peftlite.ops.exact_merge import row_blocks

    assert len(row_blocks(torch.empty(4096, 4096))) == 256
    blocks = row_blocks(torch.empty(4096, 4096, device="meta"))
    assert blocks == [(0, 1024), (1024, 2048), (2048, 3072), (3072, 4096)]
