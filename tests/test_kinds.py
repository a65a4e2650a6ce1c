"""Every layer kind through every check: one row per kind in ``KINDS``, each test parametrized over them.

A row builds a module and an input, and writes the kind's float64 reference from the formula:
``y = base(x) + scaling * branch(x)`` with the branch as the math says (not as peftlite computes it).
"""

import copy
import io
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftlite
from peftlite import PeftliteError
from tests.models import DTYPES, TOLERANCE

RANK, ALPHA = 3, 5.0


class ScaledLinear(nn.Linear):
    """A Linear subclass with its own buffer and forward: the output is scaled per feature."""

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features)
        self.register_buffer("scale", torch.linspace(0.5, 2.0, out_features))

    def forward(self, x):
        return super().forward(x) * self.scale


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    input: Callable[[torch.dtype], torch.Tensor]
    reference: Callable  # (module, x64, A64, B64, scaling) -> y64, every tensor float64


def linear_ref(m, x, a, b, s):
    return x @ m.weight.double().T + m.bias.double() + s * (x @ a.T) @ b.T


def scaled_ref(m, x, a, b, s):
    return (x @ m.weight.double().T + m.bias.double()) * m.scale.double() + s * (x @ a.T) @ b.T


def conv1d_ref(m, x, a, b, s):  # GPT-2's Conv1D: weight stored [in, out]
    return x @ m.weight.double() + m.bias.double() + s * (x @ a.T) @ b.T


def embedding_ref(m, ids, a, b, s):
    """Rows of A^T looked up by id; the padding row gets no gradient, as in the base embedding."""
    rows = a.T[ids]
    if m.padding_idx is not None:
        rows = torch.where((ids == m.padding_idx)[..., None], rows.detach(), rows)
    return m.weight.double()[ids] + s * rows @ b.T


def conv_ref(m, x, a, b, s):
    """The base convolution with weight W + s * einsum(B, A): one conv, the delta's own layout."""
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[x.ndim - 2]
    weight = m.weight.double() + s * torch.einsum("or,ri...->oi...", b.flatten(1), a)
    padding = m.padding
    if m.padding_mode != "zeros":
        x, padding = F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode), 0
    return conv(x, weight, None if m.bias is None else m.bias.double(), m.stride, padding, m.dilation)


def floats(*shape):
    return lambda dtype: torch.randn(*shape).to(dtype)


CASES = [
    Case("Linear", lambda: nn.Linear(7, 5), floats(3, 4, 7), linear_ref),
    Case("Linear subclass", lambda: ScaledLinear(6, 5), floats(2, 6), scaled_ref),
    Case("Conv1D", lambda: Conv1D(5, 7), floats(2, 3, 7), conv1d_ref),
    Case("Embedding", lambda: nn.Embedding(11, 6, padding_idx=2), lambda dtype: torch.tensor([[1, 2, 10], [0, 2, 5]]),
         embedding_ref),
    Case("Conv1d", lambda: nn.Conv1d(3, 5, 3, stride=2, padding=2, dilation=2), floats(2, 3, 13), conv_ref),
    Case("Conv2d", lambda: nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1)),
         floats(2, 3, 9, 8), conv_ref),
    Case("Conv2d reflect", lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect", bias=False),
         floats(1, 2, 6, 5), conv_ref),
    Case("Conv3d", lambda: nn.Conv3d(2, 3, 2, padding=1), floats(1, 2, 4, 3, 5), conv_ref),
]
IDS = [case.name for case in CASES]


class Host(nn.Module):
    """Puts the module at a path (``layer``), as inject sees layers in a model."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.layer = module

    def forward(self, x):
        return self.layer(x)


def adapted(case: Case, dtype=torch.float32, seed=0, **options) -> Host:
    """The case's module in a Host, LoRA injected, B (and A) nonzero: zero B would hide most bugs."""
    torch.manual_seed(seed)
    host = Host(case.build().to(dtype))
    peftlite.inject(host, rank=RANK, alpha=ALPHA, targets=["layer"], **options)
    with torch.no_grad():
        for part in (host.layer.lora_A["default"], host.layer.lora_B["default"]):
            part.copy_(torch.randn(part.shape) * 0.5)
    return host


def adapters(layer):
    return layer.lora_A["default"], layer.lora_B["default"]


def reference_and_grads(case, layer, x):
    """The float64 reference output and d(sum(y * g))/d(x, A, B) for a fixed random g."""
    a, b = (t.detach().double().requires_grad_() for t in adapters(layer))
    x64 = x.detach().double().requires_grad_() if x.is_floating_point() else x
    y = case.reference(layer, x64, a, b, ALPHA / RANK)
    g = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    inputs = [t for t in (x64, a, b) if t.requires_grad]
    grads = torch.autograd.grad((y * g).sum(), inputs)
    return y.detach(), g, grads


def assert_close_dtype(actual, expected, dtype):
    tol = TOLERANCE[dtype]
    scale = max(expected.abs().max().item(), 1e-30)
    torch.testing.assert_close(actual.detach().double(), expected, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_and_backward_match_the_float64_reference(case, dtype):
    host = adapted(case, dtype)
    x = case.input(dtype)
    if x.is_floating_point():
        x.requires_grad_()
    expected, g, grads = reference_and_grads(case, host.layer, x)
    y = host(x)
    assert y.dtype == dtype
    assert_close_dtype(y, expected, dtype)
    (y * g.to(dtype)).sum().backward()
    got = ([x.grad] if x.is_floating_point() else []) + [t.grad for t in adapters(host.layer)]
    for actual, want in zip(got, grads):
        assert_close_dtype(actual, want, dtype)
    assert host.layer.weight.grad is None  # the base stays frozen


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_the_module_keeps_its_identity_class_buffers_and_hooks(case):
    torch.manual_seed(0)
    host = Host(case.build())
    module, cls = host.layer, type(host.layer)
    base_keys = set(host.state_dict())
    calls = []
    module.register_forward_hook(lambda m, args, out: calls.append(out.shape))
    x = case.input(torch.float32)
    before = host(x)
    peftlite.inject(host, rank=RANK, targets=["layer"])
    assert host.layer is module and isinstance(module, cls) and isinstance(module, peftlite.LoRALayer)
    assert set(host.state_dict()) == base_keys | {"layer.lora_A.default", "layer.lora_B.default"}
    assert torch.equal(host(x), before)  # B = 0 (A = 0 for Embedding): exactly the base at start
    assert len(calls) == 2  # the user's hook still runs
    plain = peftlite.unload(host, merge=False)
    assert type(plain.layer) is cls and set(plain.state_dict()) == base_keys
    assert torch.equal(plain(x), before) and len(calls) == 3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merge_equals_unmerged_and_unmerge_is_bit_exact_after_100_cycles(case, dtype):
    host = adapted(case, dtype).eval()
    x = case.input(dtype)
    if case.name == "Linear subclass":  # its own forward: a merged weight need not give the same output
        refuses_merge(host)
        return
    original = host.layer.weight.detach().clone()
    unmerged = host(x)
    peftlite.merge(host)
    assert_close_dtype(host(x), unmerged.detach().double(), dtype)
    assert not torch.equal(host.layer.weight, original)
    for _ in range(100):
        peftlite.unmerge(host)
        peftlite.merge(host)
    peftlite.unmerge(host)
    assert torch.equal(host.layer.weight.view(torch.uint8), original.view(torch.uint8))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_unload_merged_gives_the_original_class_with_the_merged_weight(case):
    host = adapted(case, torch.float64).eval()
    x = case.input(torch.float64)
    if case.name == "Linear subclass":
        refuses_merge(host, lambda: peftlite.unload(host))
        return
    expected = host(x)
    cls = type(host.layer).lora_base
    plain = peftlite.unload(host)
    assert type(plain.layer) is cls and not isinstance(plain.layer, peftlite.LoRALayer)
    assert "lora_A" not in plain.layer._modules and not hasattr(plain.layer, "lora_settings")
    torch.testing.assert_close(plain(x), expected, rtol=1e-12, atol=1e-12)


def refuses_merge(host, call=None):
    before = {k: v.clone() for k, v in host.state_dict().items()}
    with pytest.raises(PeftliteError, match="ScaledLinear, a Linear subclass with its own forward"):
        (call or (lambda: peftlite.merge(host)))()
    assert type(host.layer).__name__ == "LoRAScaledLinear" and not host.layer.merged
    assert all(torch.equal(v, host.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_save_load_round_trip(case, tmp_path):
    host = adapted(case).eval()
    x = case.input(torch.float32)
    peftlite.save_adapter(host, tmp_path)
    torch.manual_seed(0)
    fresh = Host(case.build()).eval()
    fresh.load_state_dict({k: v for k, v in host.state_dict().items() if "lora_" not in k})
    peftlite.load_adapter(fresh, tmp_path)
    assert torch.equal(fresh(x), host(x))
    assert type(fresh.layer) is type(host.layer)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_deepcopy_and_pickle_keep_the_adapted_class(case):
    host = adapted(case).eval()
    x = case.input(torch.float32)
    buffer = io.BytesIO()
    torch.save(host, buffer)
    buffer.seek(0)
    for twin in (copy.deepcopy(host), torch.load(buffer, weights_only=False)):
        assert type(twin.layer) is type(host.layer)
        assert twin.layer.lora_A["default"] is not host.layer.lora_A["default"]
        assert torch.equal(twin(x), host(x))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bf16_base_gets_fp32_adapters_and_computes_in_bf16(case):
    host = adapted(case, torch.bfloat16)
    assert all(t.dtype == torch.float32 for t in adapters(host.layer))
    assert host(case.input(torch.bfloat16)).dtype == torch.bfloat16
    chosen = adapted(case, torch.bfloat16, adapter_dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in adapters(chosen.layer))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_autocast_bf16_over_fp32(case):
    host = adapted(case)
    x = case.input(torch.float32)
    expected, _, _ = reference_and_grads(case, host.layer, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = host(x)
        base_dtype = case.build()(x).dtype  # bf16, but fp32 for Embedding (not an autocast op) and ScaledLinear
    assert y.dtype == base_dtype
    assert_close_dtype(y, expected, torch.bfloat16)


def test_adapter_dtype_is_checked():
    with pytest.raises(PeftliteError, match="adapter_dtype=torch.int8"):
        peftlite.inject(Host(nn.Linear(3, 3)), targets=["layer"], adapter_dtype=torch.int8)


@pytest.mark.parametrize("module, match", [
    (nn.Conv2d(4, 4, 3, groups=2), "groups=2"),
    (nn.Embedding(5, 3, max_norm=1.0), "max_norm"),
    (nn.ConvTranspose2d(3, 3, 2), "ConvTranspose2d, which LoRA does not support; supported: nn.Linear"),
    (nn.LayerNorm(4), "LayerNorm, which LoRA does not support"),
])
def test_unsupported_modules_are_named(module, match):
    host = Host(module)
    before = copy.deepcopy(host.state_dict())
    with pytest.raises(PeftliteError, match=match):
        peftlite.inject(host, targets=["layer"])
    assert type(host.layer) is type(module) and host.state_dict().keys() == before.keys()
    assert all(p.requires_grad for p in host.parameters())  # nothing frozen either


def test_embedding_takes_no_dropout():
    host = adapted(CASES[3], dropout=0.5).train()
    ids = CASES[3].input(torch.float32)
    torch.testing.assert_close(host(ids), host(ids), rtol=0, atol=0)  # no random drops


def draw_case(draw):
    """One module of a random kind and shape, with its input."""
    family = draw(st.sampled_from(["linear", "conv1d", "embedding", "conv"]))
    if family in ("linear", "conv1d"):
        features_in, features_out = draw(st.integers(1, 9)), draw(st.integers(1, 9))
        batch = draw(st.lists(st.integers(1, 3), max_size=2))
        build = (lambda: nn.Linear(features_in, features_out)) if family == "linear" else \
            (lambda: Conv1D(features_out, features_in))
        return Case(family, build, floats(*batch, features_in), linear_ref if family == "linear" else conv1d_ref)
    if family == "embedding":
        count, dim = draw(st.integers(1, 9)), draw(st.integers(1, 7))
        padding = draw(st.one_of(st.none(), st.integers(0, count - 1)))
        ids = draw(st.lists(st.integers(0, count - 1), min_size=1, max_size=6))
        return Case(family, lambda: nn.Embedding(count, dim, padding_idx=padding), lambda dtype: torch.tensor(ids),
                    embedding_ref)
    dims = draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    padding = tuple(draw(st.integers(0, 2)) for _ in range(dims))
    size = tuple(draw(st.integers(d * (k - 1) + 1, d * (k - 1) + 4)) for k, d in zip(kernel, dilation))
    channels_in, channels_out = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    return Case(f"conv{dims}d", lambda: conv(channels_in, channels_out, kernel, stride, padding, dilation),
                floats(draw(st.integers(1, 2)), channels_in, *size), conv_ref)


@settings(max_examples=60, deadline=None)
@given(st.data(), st.integers(1, 5))
def test_every_kind_over_the_shape_space(data, rank):
    case = draw_case(data.draw)
    torch.manual_seed(0)
    host = Host(case.build())
    peftlite.inject(host, rank=rank, alpha=ALPHA * rank / RANK, targets=["layer"])  # scaling ALPHA / RANK
    with torch.no_grad():
        for part in adapters(host.layer):
            part.normal_()
    x = case.input(torch.float32)
    if x.is_floating_point():
        x.requires_grad_()
    expected, g, grads = reference_and_grads(case, host.layer, x)
    y = host(x)
    assert_close_dtype(y, expected, torch.float32)
    (y * g.float()).sum().backward()
    got = ([x.grad] if x.is_floating_point() else []) + [t.grad for t in adapters(host.layer)]
    for actual, want in zip(got, grads):
        assert_close_dtype(actual, want, torch.float32)
