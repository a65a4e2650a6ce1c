"""LoRALinear against the formula in float64: forward, backward, init, dropout, merge, errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from peftlite import LoRALinear, PeftliteError
from peftlite.ops.exact_merge import _BITS
from peftlite.ops.reference import lora_backward, lora_forward
from tests.models import DTYPES, assert_close_scaled, assert_within_rounding, keep_mask


def make_layer(in_features, out_features, rank, dtype=torch.float32, bias=True, seed=0, **kwargs):
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(in_features, out_features, bias=bias).to(dtype), rank, **kwargs)
    with torch.no_grad():
        layer.lora_B["default"].normal_(0, 0.5)  # nonzero: zero B hides bugs in the update path
    return layer


def layer_values(layer, absolute=False):
    """(weight, bias, A, B, scaling) in float64; with ``absolute``, their absolute values."""
    values = [None if t is None else t.detach().double() for t in (layer.weight, layer.bias, layer.lora_A["default"],
                                                                    layer.lora_B["default"])]
    if absolute:
        values = [None if t is None else t.abs() for t in values]
    return (*values, abs(layer.lora_settings["default"].scaling) if absolute else layer.lora_settings["default"].scaling)


def reference(x, layer, keep=None):
    """The layer's output from ops.reference.lora_forward, everything in float64."""
    return lora_forward(x.detach().double(), *layer_values(layer), keep)


def reference_grads(x, layer, grad_out, keep=None):
    """Gradients of <y, grad_out> w.r.t. x, A and B: float64 autograd through the reference forward."""
    x64 = x.detach().double().requires_grad_(True)
    weight, _, a, b, scaling = layer_values(layer)
    a, b = a.requires_grad_(True), b.requires_grad_(True)
    lora_forward(x64, weight, None, a, b, scaling, keep).backward(grad_out.double())
    return x64.grad, a.grad, b.grad


def check_against_reference(layer, x, dtype, keep=None):
    """Forward and backward of ``layer`` against the float64 reference; returns the output.

    Errors are bounded by the dtype's tolerance times the same formulas on absolute values.
    """
    y = layer(x)
    x_abs = x.detach().double().abs()
    weight, bias, a, b, scaling = layer_values(layer, absolute=True)
    assert_within_rounding(y, reference(x, layer, keep), lora_forward(x_abs, weight, bias, a, b, scaling, keep), dtype)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    expected = reference_grads(x, layer, grad_out, keep)
    k, n = layer.in_features, layer.out_features
    dx_mag, da_mag, db_mag = lora_backward(grad_out.double().abs().reshape(-1, n), x_abs.reshape(-1, k), weight, a,
                                           b, scaling, None if keep is None else keep.reshape(-1, k))
    magnitudes = (dx_mag.view(x.shape), da_mag, db_mag)
    for got, want, magnitude in zip((x.grad, layer.lora_A["default"].grad, layer.lora_B["default"].grad), expected, magnitudes):
        assert_within_rounding(got, want, magnitude, dtype)
    return y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_backward_match_float64_reference(dtype, bias):
    layer = make_layer(37, 29, 5, dtype, bias=bias, alpha=11)
    x = torch.randn(3, 7, 37).to(dtype).requires_grad_(True)
    y = check_against_reference(layer, x, dtype)
    assert y.shape == (3, 7, 29) and y.dtype == dtype
    assert layer.weight.grad is None and (layer.bias is None or layer.bias.grad is None)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    in_features=st.integers(1, 40), out_features=st.integers(1, 40), rank=st.integers(1, 64),
    dtype=st.sampled_from(DTYPES), alpha=st.floats(0.25, 64), rslora=st.booleans(),
)
def test_matches_reference_over_shapes(batch, in_features, out_features, rank, dtype, alpha, rslora):
    layer = make_layer(in_features, out_features, rank, dtype, alpha=alpha, rslora=rslora)
    expected_scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
    assert layer.lora_settings["default"].scaling == pytest.approx(expected_scaling)
    x = torch.randn(*batch, in_features).to(dtype).requires_grad_(True)
    assert check_against_reference(layer, x, dtype).shape == (*batch, out_features)


def test_gradcheck_float64():
    layer = make_layer(6, 5, 3, torch.float64, alpha=4)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a, b: torch.func.functional_call(layer, {"lora_A.default": a, "lora_B.default": b}, x),
                                    (x, layer.lora_A["default"], layer.lora_B["default"]))


def test_non_contiguous_input():
    layer = make_layer(8, 6, 2)
    x = torch.randn(8, 5, 3).permute(2, 1, 0)  # [3, 5, 8], not contiguous
    assert not x.is_contiguous()
    assert_close_scaled(layer(x), reference(x, layer), torch.float32)


def test_holds_base_parameters_without_copying_and_freezes_them():
    base = nn.Linear(10, 7)
    layer = LoRALinear(base, rank=3)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A["default"].requires_grad and layer.lora_B["default"].requires_grad
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A.default", "lora_B.default"}
    assert layer.lora_A["default"].shape == (3, 10) and layer.lora_B["default"].shape == (7, 3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_default_init_equals_base_exactly(dtype):
    torch.manual_seed(0)
    base = nn.Linear(33, 17).to(dtype)
    x = torch.randn(4, 33).to(dtype)
    expected = base(x)
    layer = LoRALinear(base, rank=8)
    adapter_dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype  # fp32 on 16-bit bases
    assert layer.lora_A["default"].dtype == adapter_dtype and layer.lora_B["default"].dtype == adapter_dtype
    assert torch.equal(layer(x), expected)
    assert layer.lora_A["default"].abs().sum() > 0 and layer.lora_B["default"].abs().sum() == 0
    bound = 1 / math.sqrt(33)  # kaiming_uniform(a=sqrt(5)) bound for fan_in 33
    assert layer.lora_A["default"].abs().max() <= bound


def test_gaussian_init_std_is_one_over_rank():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(2000, 4), rank=4, init="gaussian")
    assert layer.lora_A["default"].std().item() == pytest.approx(1 / 4, rel=0.03)
    assert layer.lora_A["default"].mean().abs().item() < 0.01
    assert layer.lora_B["default"].abs().sum() == 0


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_applies_to_the_adapter_input_only(p):
    layer = make_layer(64, 16, 4, dropout=p)
    x = torch.randn(50, 64, requires_grad=True)
    keep = keep_mask(x.shape, p, 123)
    torch.manual_seed(123)  # the forward draws the same dropped positions
    check_against_reference(layer, x, torch.float32, keep)
    layer.eval()
    assert_close_scaled(layer(x), reference(x, layer), torch.float32)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("out_features", [7, 16, 40])  # narrower, as wide as, wider than the input
def test_output_can_be_modified_in_place(p, out_features):
    """Models write into layer outputs (``y += residual``, ``y *= scale``); gradients stay right."""
    layer = make_layer(16, out_features, 4, dropout=p)
    x = torch.randn(3, 5, 16, requires_grad=True)
    keep = keep_mask((15, 16), p, 7).view(3, 5, 16) if p else None
    torch.manual_seed(7)
    y = layer(x)
    y.mul_(2.0).add_(1.0)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    expected = reference_grads(x, layer, 2.0 * grad_out, keep)
    for got, want in zip((x.grad, layer.lora_A["default"].grad, layer.lora_B["default"].grad), expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_autocast_bfloat16():
    layer = make_layer(16, 8, 4)
    x = torch.randn(5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert_close_scaled(y, reference(x, layer), torch.bfloat16)


def bits(t):
    return t.detach().view(_BITS[t.dtype]).clone()


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_equals_unmerged_and_unmerge_is_bit_exact(dtype):
    layer = make_layer(48, 40, 8, dtype, alpha=16)
    original = bits(layer.weight)
    x = torch.randn(6, 48).to(dtype)
    expected = reference(x, layer)
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        layer.merge()  # idempotent
        merged = layer(x)
    assert layer.merged and layer.merge_state_bytes() >= layer.weight.numel()
    assert not torch.equal(bits(layer.weight), original)
    assert_close_scaled(merged, expected, dtype)
    assert_close_scaled(unmerged, expected, dtype)
    for _ in range(200):
        layer.unmerge()
        layer.unmerge()  # idempotent
        assert torch.equal(bits(layer.weight), original)
        layer.merge()
    layer.unmerge()
    assert torch.equal(bits(layer.weight), original) and layer.merge_state_bytes() == 0


def test_merged_forward_is_one_linear():
    layer = make_layer(12, 9, 3)
    layer.merge()
    x = torch.randn(4, 12)
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_merge_refuses_non_finite_and_changes_nothing():
    layer = make_layer(8, 8, 2, torch.float16)
    with torch.no_grad():
        layer.lora_B["default"].fill_(300.0)
        layer.lora_A["default"].fill_(300.0)  # 300*300*2 overflows float16
    before = bits(layer.weight)
    with pytest.raises(PeftliteError, match="NaN or Inf"):
        layer.merge()
    assert not layer.merged and torch.equal(bits(layer.weight), before)


def test_training_a_merged_layer_is_an_error():
    layer = make_layer(8, 8, 2)
    layer.merge()
    with pytest.raises(PeftliteError, match="unmerge"):
        layer(torch.randn(2, 8))
    with torch.no_grad():
        layer(torch.randn(2, 8))  # inference is fine
    layer.eval()
    layer(torch.randn(2, 8))


@pytest.mark.parametrize("change", [
    lambda layer: layer.lora_A["default"].add_(1.0), lambda layer: layer.lora_B["default"].mul_(2.0),
    lambda layer: layer.weight.copy_(torch.randn(8, 8)), lambda layer: layer.to(torch.float64),
])
def test_changes_while_merged_refuse_unmerge(change):
    layer = make_layer(8, 8, 2)
    layer.merge()
    with torch.no_grad():
        change(layer)
    merged = bits(layer.weight)
    with pytest.raises(PeftliteError, match="modified"):
        layer.unmerge()
    assert layer.merged and torch.equal(bits(layer.weight), merged)


@pytest.mark.parametrize("kwargs, match", [
    ({"rank": 0}, "rank=0"), ({"rank": 2.5}, "rank=2.5"), ({"alpha": 0}, "alpha=0"), ({"alpha": -1.0}, "alpha=-1.0"),
    ({"dropout": 1.0}, "dropout=1.0"), ({"dropout": -0.1}, "dropout=-0.1"), ({"init": "pissa"}, "init='pissa'"),
])
def test_bad_options_raise(kwargs, match):
    base = nn.Linear(4, 4)
    before = base.weight.detach().clone()
    with pytest.raises(PeftliteError, match=match):
        LoRALinear(base, **{"rank": 2, **kwargs})
    assert base.weight.requires_grad and torch.equal(base.weight, before)


def test_bad_base_raises():
    with pytest.raises(PeftliteError, match="Conv1d"):
        LoRALinear(nn.Conv1d(2, 2, 1))
    with pytest.raises(PeftliteError, match="already has LoRA"):
        LoRALinear(LoRALinear(nn.Linear(3, 3)))


@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing_recomputes_the_same_dropout(reentrant):
    from torch.utils.checkpoint import checkpoint

    layer = make_layer(24, 12, 4, dropout=0.3)
    x = torch.randn(9, 24, requires_grad=True)
    grad_out = torch.randn(9, 12)
    grads = []
    for use_checkpoint in (False, True):
        torch.manual_seed(11)
        y = checkpoint(layer, x, use_reentrant=reentrant) if use_checkpoint else layer(x)
        y.backward(grad_out)
        grads.append([t.grad.clone() for t in (x, layer.lora_A["default"], layer.lora_B["default"])])
        for t in (x, layer.lora_A["default"], layer.lora_B["default"]):
            t.grad = None
    for plain, recomputed in zip(*grads):
        assert torch.equal(plain, recomputed)


def test_reset_lora_rejects_unknown_init_and_merged_layers():
    layer = make_layer(6, 4, 2)
    before = layer.lora_B["default"].detach().clone()
    with pytest.raises(PeftliteError, match="init='pissa'"):
        layer.reset_lora("pissa")
    assert torch.equal(layer.lora_B["default"], before)
    layer.merge()
    with pytest.raises(PeftliteError, match="unmerge"):
        layer.reset_lora()
    layer.unmerge()
    layer.reset_lora("gaussian")
    assert layer.lora_B["default"].abs().sum() == 0
