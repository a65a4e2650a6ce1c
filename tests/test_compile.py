"""torch.compile(fullgraph=True) on models with injected LoRA: no graph break, same outputs and gradients."""

import pytest
import torch
import torch._inductor.config
from torch import nn

import peftlite
from tests.models import TinyMLP, randomize_lora


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_compiled_model_matches_eager_forward_and_backward(dropout):
    with torch._inductor.config.patch(fallback_random=True):  # compiled RNG draws as eager's
        check_compiled_matches_eager(dropout)


def check_compiled_matches_eager(dropout):
    torch.manual_seed(0)
    model = peftlite.inject(TinyMLP(), rank=3, dropout=dropout)
    randomize_lora(model)
    model.train()
    x = torch.randn(9, 12, requires_grad=True)
    torch.manual_seed(7)
    eager = model(x)
    eager.square().sum().backward()
    expected, expected_dx = grads(model), x.grad.clone()
    model.zero_grad()
    x.grad = None
    compiled = torch.compile(model, fullgraph=True, backend="inductor")  # fullgraph: a graph break raises
    torch.manual_seed(7)
    out = compiled(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(x.grad, expected_dx)
    got = grads(model)
    assert got.keys() == expected.keys() == {f"{n}.lora_{p}.default" for n in ("fc1", "fc2") for p in "AB"}
    for name in expected:
        torch.testing.assert_close(got[name], expected[name])


def test_compiled_hugging_face_model_with_lora_has_no_graph_break():
    from tests.models import tiny_llama

    torch.manual_seed(0)
    model = peftlite.inject(tiny_llama(), rank=2, targets=["q_proj", "v_proj", "down_proj"])
    randomize_lora(model)
    ids = torch.randint(0, 64, (2, 6))
    expected = model(input_ids=ids).logits
    explanation = torch._dynamo.explain(model)(input_ids=ids)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(input_ids=ids).logits, expected)


def test_merged_layer_compiles_too():
    layer = peftlite.LoRALinear(nn.Linear(8, 4), rank=2)
    randomize_lora(layer)
    layer.eval().merge()
    x = torch.randn(3, 8)
    torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), layer(x))


def test_triton_backend_compiles_without_graph_breaks(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("PEFTLITE_BACKEND", "triton")
    torch.manual_seed(0)
    model = peftlite.inject(TinyMLP(), rank=3)
    randomize_lora(model)
    x = torch.randn(20, 12, requires_grad=True)
    expected = model(x)
    expected.sum().backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    out = torch.compile(model, fullgraph=True)(x)
    out.sum().backward()
    torch.testing.assert_close(out, expected)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad)


def test_every_layer_kind_compiles_with_fullgraph():
    """Compiled and eager agree to fp32 rounding of the reference's magnitude (inductor may pick another
    convolution algorithm, so sums of ~1e3 differ in the last bits)."""
    from tests.test_kinds import CASES, adapted, assert_close_dtype

    for case in CASES:
        host = adapted(case)
        x = case.input(torch.float32)
        if x.is_floating_point():
            x.requires_grad_()
        expected = host(x)
        expected.square().sum().backward()
        expected_grads = {n: p.grad.clone() for n, p in host.named_parameters() if p.grad is not None}
        host.zero_grad()
        out = torch.compile(host, fullgraph=True)(x)
        out.square().sum().backward()
        assert_close_dtype(out, expected.detach().double(), torch.float32)
        assert expected_grads.keys() == {"layer.lora_A.default", "layer.lora_B.default"}, case.name
        for name, grad in expected_grads.items():
            assert_close_dtype(dict(host.named_parameters())[name].grad, grad.double(), torch.float32)
        torch._dynamo.reset()


class Embedded(nn.Module):
    """A plain-PyTorch model with a frozen (unadapted) embedding before its Linear layers."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(17, 12)
        self.mlp = TinyMLP()

    def forward(self, ids):
        return self.mlp(self.embed(ids))


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_a_model_with_a_frozen_embedding_compiles_with_fullgraph_forward_and_backward(method):
    torch.manual_seed(0)
    options = {"rank": 3} if method == "lora" else {"method": "adapter", "targets": ["mlp.fc1"], "init": "normal"}
    model = peftlite.inject(Embedded(), **options).train()
    randomize_lora(model)
    ids = torch.randint(0, 17, (3, 5))
    eager = model(ids)
    eager.square().sum().backward()
    expected = grads(model)
    assert expected  # the adapters got gradients
    model.zero_grad()
    out = torch.compile(model, fullgraph=True)(ids)  # fullgraph: a graph break raises
    out.square().sum().backward()
    torch.testing.assert_close(out, eager)
    got = grads(model)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name])
    torch._dynamo.reset()
