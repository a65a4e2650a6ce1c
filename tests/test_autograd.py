"""The torch path (custom op and its eager autograd.Function twin) against ops.reference: forward, backward,
needs_input_grad."""

import itertools

import pytest
import torch

from peftlite.ops.autograd import TORCH, lora_linear
from peftlite.ops.dropout import draw_seed
from peftlite.ops.reference import lora_backward, lora_forward
from tests.models import DTYPES, assert_close_scaled, assert_within_rounding, keep_mask, num_threads


ENTRIES = ("function", "op")  # eager training (autograd.Function) and the custom op torch.compile traces


def run(entry, x, weight, bias, a, b, scaling, p=0.0):
    """The update on 2-D x through one entry point; dropout positions drawn from torch's global generator."""
    if entry == "function":
        return lora_linear(x, weight, bias, a, b, scaling, p)
    return TORCH.op(x, weight, bias, a, b, float(scaling), float(p), draw_seed(p))[0]


def tensors(m, k, n, r, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    weight, bias = torch.randn(n, k, generator=g) / k ** 0.5, torch.randn(n, generator=g)
    a, b = torch.randn(r, k, generator=g) / k ** 0.5, torch.randn(n, r, generator=g)  # nonzero B
    return [t.to(dtype) for t in (x, weight, bias, a, b)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, k, n, r", [(1, 1, 1, 1), (13, 7, 5, 3), (33, 65, 17, 16), (4, 3, 9, 64),
                                        (41, 9, 20, 4)])
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("entry", ENTRIES)
def test_forward_backward_match_reference(dtype, m, k, n, r, p, entry):
    check_against_reference(entry, dtype, m, k, n, r, p)


@pytest.mark.parametrize("count, m", [(2, 1000), (3, 1000), (2, 2048)])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_large_batches_on_several_threads_match_reference(count, m, p):
    with num_threads(count):
        check_against_reference("function", torch.float32, m, 37, 29, 16, p)


def check_against_reference(entry, dtype, m, k, n, r, p):
    x, weight, bias, a, b = tensors(m, k, n, r, dtype)
    for t in (x, a, b):
        t.requires_grad_(True)
    torch.manual_seed(5)
    y = run(entry, x, weight, bias, a, b, 1.5, p)
    keep = keep_mask(x.shape, p, 5) if p else None
    d = [t.detach().double() for t in (x, weight, bias, a, b)]
    magnitude = [t.abs() for t in d]  # the formulas on absolute values bound the rounding error
    assert_within_rounding(y, lora_forward(*d, 1.5, keep), lora_forward(*magnitude, 1.5, keep), dtype)
    grad = torch.randn(m, n).to(dtype)
    y.backward(grad)
    expected = lora_backward(grad.double(), d[0], d[1], d[3], d[4], 1.5, keep)
    bounds = lora_backward(grad.double().abs(), *magnitude[:2], *magnitude[3:], 1.5, keep)
    for got, want, bound in zip((x.grad, a.grad, b.grad), expected, bounds):
        assert_within_rounding(got, want, bound, dtype)


@pytest.mark.parametrize("flags", list(itertools.product([False, True], repeat=5)))
@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_only_requested_gradients_are_computed(flags, entry, p):
    """Every needs_input_grad combination, with and without dropout (whose backward shares one buffer)."""
    values = tensors(6, 5, 4, 2, torch.float64)
    inputs = [t.clone().requires_grad_(f) for t, f in zip(values, flags)]
    expected = [t.clone().requires_grad_(f) for t, f in zip(values, flags)]
    torch.manual_seed(3)
    y = run(entry, *inputs, 0.7, p)
    y_ref = lora_forward(*expected, 0.7, keep_mask((6, 5), p, 3) if p else None)
    torch.testing.assert_close(y, y_ref)
    if not any(flags):
        assert not y.requires_grad
        return
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    for got, want, flag in zip(inputs, expected, flags):
        assert (got.grad is None) == (not flag)
        if flag:
            torch.testing.assert_close(got.grad, want.grad)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("entry", ENTRIES)
def test_gradcheck(p, entry):
    x, weight, bias, a, b = tensors(5, 4, 3, 2, torch.float64)
    inputs = [t.requires_grad_(True) for t in (x, weight, bias, a, b)]

    def seeded(*args):
        torch.manual_seed(0)  # the same dropped positions on every evaluation
        return run(entry, *args, 1.3, p)

    assert torch.autograd.gradcheck(seeded, inputs)


def test_batched_and_non_contiguous_inputs():
    x, weight, bias, a, b = tensors(24, 6, 5, 3, torch.float32)
    x3 = x.view(4, 6, 6).transpose(0, 1)  # [6, 4, 6], not contiguous
    y = lora_linear(x3, weight, bias, a, b, 2.0)
    assert y.shape == (6, 4, 5)
    expected = lora_forward(*(t.double() for t in (x3.reshape(-1, 6), weight, bias, a, b)), 2.0)
    assert_close_scaled(y.reshape(-1, 5), expected, torch.float32)


def test_empty_batch():
    x, weight, bias, a, b = tensors(0, 4, 3, 2, torch.float32)
    a.requires_grad_(True)
    y = lora_linear(x, weight, bias, a, b, 1.0, 0.1)
    assert y.shape == (0, 3)
    y.sum().backward()
    assert torch.equal(a.grad, torch.zeros_like(a))


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_custom_ops_pass_torch_library_opcheck(p):
    from peftlite.ops.autograd import TORCH
    from peftlite.ops.dropout import draw_seed

    x, weight, bias, a, b = tensors(7, 5, 6, 3, torch.float32)
    a.requires_grad_(True)
    b.requires_grad_(True)
    seed = draw_seed(p)
    torch.library.opcheck(TORCH.op, (x, weight, bias, a, b, 1.5, p, seed))
    grad, t = torch.randn(7, 6), torch.randn(7, 3)
    torch.library.opcheck(TORCH.backward_op, (grad, x, weight, a, b, t, 1.5, p, seed, True, True, True),
                          test_utils=("test_schema", "test_faketensor"))


def test_training_with_dropout_reads_nothing_back_from_the_device(monkeypatch):
    """No .item()/.tolist(): on a GPU either would stall the host once per layer (forward and backward)."""
    x, weight, bias, a, b = tensors(37, 11, 13, 4, torch.float32)
    for t in (x, a, b):
        t.requires_grad_(True)

    def refuse(*args, **kwargs):
        raise AssertionError("read a value back to the host")

    monkeypatch.setattr(torch.Tensor, "item", refuse)
    monkeypatch.setattr(torch.Tensor, "tolist", refuse)
    lora_linear(x, weight, bias, a, b, 1.5, 0.3).sum().backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_with_dropout_does_not_synchronize_on_cuda():
    x, weight, bias, a, b = (t.cuda() for t in tensors(512, 256, 384, 16, torch.bfloat16))
    for t in (x, a, b):
        t.requires_grad_(True)
    lora_linear(x, weight, bias, a, b, 1.5, 0.1).sum().backward()  # warm up: first calls may sync (lazy init)
    torch.cuda.set_sync_debug_mode("error")
    try:
        lora_linear(x, weight, bias, a, b, 1.5, 0.1).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_double_backward_is_refused_not_silently_wrong():
    x, weight, bias, a, b = tensors(6, 5, 4, 2, torch.float64)
    x.requires_grad_(True)
    a.requires_grad_(True)
    (dx,) = torch.autograd.grad(lora_linear(x, weight, bias, a, b, 1.5).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        dx.sum().backward()
