"""torch.compile with several adapters: switching, disabling and hot swapping do not recompile once each mode has
been seen; a per-row batch compiles with fullgraph=True (forward and backward)."""

import pytest
import torch
import torch._dynamo

import peftlite
from tests.models import TinyMLP


def two_adapter_mlp(seed=0):
    torch.manual_seed(seed)
    model = TinyMLP()
    peftlite.inject(model, rank=3, alpha=6, name="a")
    peftlite.inject(model, rank=3, alpha=2, name="b")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return model


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_switching_and_disabling_do_not_recompile_once_each_mode_was_seen():
    model = two_adapter_mlp().eval()
    x = torch.randn(5, 12)
    expected = {}
    for mode in ("a", "b", "off"):
        if mode == "off":
            with peftlite.disable_adapters(model):
                expected[mode] = model(x)
        else:
            peftlite.set_adapter(model, mode)
            expected[mode] = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="eager")

    def run(mode):
        if mode == "off":
            with peftlite.disable_adapters(model):
                return compiled(x)
        peftlite.set_adapter(model, mode)
        return compiled(x)

    for mode in ("a", "b", "off"):  # each mode compiled once
        run(mode)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for mode in ("b", "off", "a", "off", "b", "a"):
            torch.testing.assert_close(run(mode), expected[mode])


def test_hot_swapping_an_adapter_does_not_recompile(tmp_path):
    donor = two_adapter_mlp().eval()  # the same base, other adapter values
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in donor.named_parameters():
            if "lora" in name:
                p.normal_(0, 0.3)
    peftlite.set_adapter(donor, "b")
    peftlite.save_adapter(donor, tmp_path, name="b")  # rank 3, alpha 2: loaded over "a" (alpha 6)
    x = torch.randn(5, 12)
    expected = donor(x)
    model = two_adapter_mlp().eval()
    peftlite.set_adapter(model, "a")
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    compiled(x)
    peftlite.load_adapter(model, tmp_path, name="a")
    with torch._dynamo.config.patch(error_on_recompile=True):
        torch.testing.assert_close(compiled(x), expected)


@pytest.mark.parametrize("tokens", [1, 9])  # the stacked and the gathered form
def test_a_per_row_batch_compiles_with_fullgraph_forward_and_backward(tokens):
    model = two_adapter_mlp()
    x = torch.randn(4, tokens, 12)
    rows = ["b", None, "a", "b"]
    with peftlite.adapter_per_row(model, rows):
        eager = model(x)
        eager.square().sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    with peftlite.adapter_per_row(model, rows):
        out = compiled(x)
        out.square().sum().backward()
    torch.testing.assert_close(out, eager)
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys() and expected
    for name in expected:
        torch.testing.assert_close(got[name], expected[name])


def test_a_compiled_llama_serves_a_mixed_batch_without_graph_breaks():
    from tests.models import tiny_llama

    model = tiny_llama()
    for name in ("a", "b"):
        peftlite.inject(model, rank=2, name=name)
    ids = torch.randint(0, 64, (3, 6))
    with peftlite.adapter_per_row(model, ["a", "b", None]), torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(ids).logits, eager)


@pytest.mark.parametrize("tokens", [1, 9])
def test_serving_batch_after_batch_under_compile_does_not_recompile(tokens):
    model = two_adapter_mlp().eval()
    peftlite.inject(model, rank=2, name="c")
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    x = torch.randn(4, tokens, 12)
    expected = {}
    batches = (["a", "b", None, "a"], ["b", "a", "a", None], ["c", "c", "b", "a"], ["a", "a", "a", "a"])
    for rows in batches:
        with peftlite.adapter_per_row(model, rows), torch.no_grad():
            expected[tuple(rows)] = model(x)
    with torch.no_grad(), peftlite.adapter_per_row(model, batches[0]):
        compiled(x)
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        for rows in batches[1:]:
            with peftlite.adapter_per_row(model, rows):
                torch.testing.assert_close(compiled(x), expected[tuple(rows)])
