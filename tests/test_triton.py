"""The Triton kernels (PEFTLITE_BACKEND=triton) against float64 references, forward and backward.

Without a GPU they run through Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1), which is slow: shapes stay small, partial tiles and odd sizes included.
"""

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

import peftlite
from peftlite.ops.dropout import draw_seed
from peftlite.ops.reference import lora_backward, lora_forward
from tests.models import TOLERANCE, assert_within_rounding

triton_lora = pytest.importorskip("peftlite.ops.triton_lora")  # needs the triton package (test extra)
from peftlite.ops.autograd import TRITON  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def tensors(m, k, n, r, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    weight, bias = torch.randn(n, k, generator=g) / k ** 0.5, torch.randn(n, generator=g)
    a, b = torch.randn(r, k, generator=g) / k ** 0.5, torch.randn(n, r, generator=g)  # nonzero B
    return [t.to(DEVICE, dtype) for t in (x, weight, bias, a, b)]


def references(x, weight, bias, a, b, scaling, grad, keep):
    f64 = [t.double() for t in (x, weight, bias, a, b)]
    y = lora_forward(*f64, scaling, keep)
    dx, da, db = lora_backward(grad.double(), f64[0], f64[1], f64[3], f64[4], scaling, keep)
    absolute = [t.abs() for t in f64]
    keep_abs = None if keep is None else keep.abs()
    y_mag = lora_forward(*absolute, scaling, keep_abs)
    mags = lora_backward(grad.double().abs(), absolute[0], absolute[1], absolute[3], absolute[4], scaling, keep_abs)
    return (y, dx, da, db), (y_mag, *mags)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, k, n, r", [(1, 1, 1, 1), (19, 33, 17, 3), (5, 7, 40, 16), (17, 20, 1, 64),
                                        (16, 35, 18, 5)])  # m <= 16: the one-launch decode kernel
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_forward_backward_match_float64_reference(dtype, m, k, n, r, p):
    x, weight, bias, a, b = tensors(m, k, n, r, dtype)
    for t in (x, a, b):
        t.requires_grad_(True)
    seed = draw_seed(p)
    y, _ = TRITON.op(x, weight, bias, a, b, 1.5, p, seed)
    grad = torch.randn(m, n, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    y.backward(grad)
    keep = triton_lora.keep_mask(m, k, p, seed, DEVICE).double() / (1 - p) if p else None
    expected, magnitude = references(x, weight, bias, a, b, 1.5, grad, keep)
    for got, want, mag in zip((y, x.grad, a.grad, b.grad), expected, magnitude):
        assert_within_rounding(got, want, 4 * mag, dtype)  # a few roundings more than one GEMM: tiles, epilogue


@pytest.mark.parametrize("flags", list(itertools.product([False, True], repeat=3)))
def test_only_requested_gradients(flags):
    x, weight, bias, a, b = tensors(9, 10, 11, 2, torch.float32)
    for t, flag in zip((x, a, b), flags):
        t.requires_grad_(flag)
    y, _ = TRITON.op(x, weight, bias, a, b, 0.5, 0.0, draw_seed(0.0))
    if not any(flags):
        assert not y.requires_grad
        return
    y.sum().backward()
    assert [t.grad is not None for t in (x, a, b)] == list(flags)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_decode_and_two_launch_forwards_agree(p, monkeypatch):
    x, weight, bias, a, b = tensors(12, 37, 21, 4, torch.float32)
    seed = draw_seed(p)
    decoded = triton_lora.forward(x, weight, bias, a, b, 1.5, p, seed)
    monkeypatch.setattr(triton_lora, "DECODE_ROWS", 0)
    for got, want in zip(triton_lora.forward(x, weight, bias, a, b, 1.5, p, seed), decoded):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # same mask, same math; tiling differs


def test_keep_mask_fraction_and_reproducibility():
    seed = draw_seed(0.3)
    keep = triton_lora.keep_mask(64, 50, 0.3, seed, DEVICE)
    assert torch.equal(keep, triton_lora.keep_mask(64, 50, 0.3, seed, DEVICE))
    dropped = 1 - keep.float().mean().item()
    assert abs(dropped - 0.3) < 5 * (0.3 * 0.7 / keep.numel()) ** 0.5


def test_lora_linear_under_triton_backend_with_odd_inputs(monkeypatch):
    monkeypatch.setenv("PEFTLITE_BACKEND", "triton")
    torch.manual_seed(0)
    layer = peftlite.LoRALinear(torch.nn.Linear(12, 7), rank=3).to(DEVICE)
    with torch.no_grad():
        layer.lora_B["default"].normal_()
    x = torch.randn(4, 12, 3, device=DEVICE).transpose(1, 2)  # 3-D and non-contiguous
    out = layer(x)
    monkeypatch.setenv("PEFTLITE_BACKEND", "torch")
    torch.testing.assert_close(out, layer(x), rtol=TOLERANCE[torch.float32] * 10, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="large shapes run on a GPU only (the interpreter is slow)")
@pytest.mark.parametrize("dtype", DTYPES)
def test_large_shapes_on_gpu(dtype):
    x, weight, bias, a, b = tensors(1031, 4096, 4095, 16, dtype)
    for t in (x, a, b):
        t.requires_grad_(True)
    seed = draw_seed(0.1)
    y, _ = TRITON.op(x, weight, bias, a, b, 2.0, 0.1, seed)
    grad = torch.randn(1031, 4095, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    y.backward(grad)
    keep = triton_lora.keep_mask(1031, 4096, 0.1, seed, DEVICE).double() / 0.9
    expected, magnitude = references(x, weight, bias, a, b, 2.0, grad, keep)
    for got, want, mag in zip((y, x.grad, a.grad, b.grad), expected, magnitude):
        assert_within_rounding(got, want, 4 * mag, dtype)


@settings(max_examples=12, deadline=None)
@given(m=st.integers(1, 40), k=st.integers(1, 24), n=st.integers(1, 24), r=st.integers(1, 20),
       dtype=st.sampled_from(DTYPES), p=st.sampled_from([0.0, 0.2]), scaling=st.floats(0.25, 4.0))
def test_shape_space(m, k, n, r, dtype, p, scaling):
    x, weight, bias, a, b = tensors(m, k, n, r, dtype, seed=m * 131 + k * 17 + n)
    for t in (x, a, b):
        t.requires_grad_(True)
    seed = draw_seed(p)
    y, _ = TRITON.op(x, weight, bias, a, b, scaling, p, seed)
    grad = torch.randn(m, n, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    y.backward(grad)
    keep = triton_lora.keep_mask(m, k, p, seed, DEVICE).double() / (1 - p) if p else None
    expected, magnitude = references(x, weight, bias, a, b, scaling, grad, keep)
    for got, want, mag in zip((y, x.grad, a.grad, b.grad), expected, magnitude):
        assert_within_rounding(got, want, 4 * mag, dtype)


@pytest.mark.parametrize("m, k, n", [(2**20, 2**11, 16), (2**20, 16, 2**11), (16, 2**16, 2**15)])
def test_shapes_past_int32_offsets_are_refused_before_any_launch(m, k, n):
    """Meta tensors: nothing is allocated; the check comes before any kernel."""
    x, weight = torch.empty(m, k, device="meta"), torch.empty(n, k, device="meta")
    a, b = torch.empty(4, k, device="meta"), torch.empty(n, 4, device="meta")
    with pytest.raises(peftlite.PeftliteError, match="PEFTLITE_BACKEND=torch"):
        triton_lora.forward(x, weight, None, a, b, 1.0, 0.0, draw_seed(0.0))
    with pytest.raises(peftlite.PeftliteError, match="int32 offsets"):
        triton_lora.backward(torch.empty(m, n, device="meta"), x, weight, a, b, torch.empty(m, 4, device="meta"),
                             1.0, 0.0, draw_seed(0.0), True, True, True)
