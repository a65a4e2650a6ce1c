"""PEFTLITE_BACKEND: the reference and torch paths agree, forward and backward, with dropout from one seed."""

import pytest
import torch

import peftlite
from tests.models import TinyMLP, randomize_lora


def run(model, x, seed):
    model.zero_grad()
    x.grad = None
    torch.manual_seed(seed)
    out = model(x)
    out.square().sum().backward()
    return out, x.grad.clone(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_reference_and_torch_backends_agree(dropout, monkeypatch):
    torch.manual_seed(0)
    model = peftlite.inject(TinyMLP(), rank=4, dropout=dropout).double().train()
    randomize_lora(model)
    x = torch.randn(3, 7, 12, dtype=torch.float64, requires_grad=True)
    monkeypatch.setenv("PEFTLITE_BACKEND", "reference")
    expected = run(model, x, 5)
    monkeypatch.setenv("PEFTLITE_BACKEND", "torch")
    got = run(model, x, 5)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])
    assert got[2].keys() == expected[2].keys() and len(got[2]) == 4
    for name in expected[2]:
        torch.testing.assert_close(got[2][name], expected[2][name])


def test_unknown_backend_is_named(monkeypatch):
    monkeypatch.setenv("PEFTLITE_BACKEND", "cuda")
    layer = peftlite.LoRALinear(torch.nn.Linear(4, 3), rank=2)
    with pytest.raises(peftlite.PeftliteError, match="PEFTLITE_BACKEND='cuda'"):
        layer(torch.randn(2, 4))
