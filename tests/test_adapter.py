"""Adapter: exact identity at init, the math against float64 references, state dict, inject/unload/merge, errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import peftlite
from peftlite import Adapter, PeftliteError
from peftlite.lora import lora_layers
from tests.models import DTYPES, TOLERANCE, assert_unchanged, snapshot, tiny_bert, tiny_llama

ACTS = {"relu": torch.relu, "gelu": nn.functional.gelu, "silu": nn.functional.silu, "tanh": torch.tanh}


def randomize(adapter: Adapter, seed: int = 3) -> None:
    """Nonzero up projection (and scale): zero-init would hide most bugs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapter.bottleneck.parameters():
            param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float64) * 0.3 + 0.1)


def reference(adapter: Adapter, x: torch.Tensor, activation: str) -> torch.Tensor:
    """The formula in float64: h + s * up(act(down(source)))."""
    b = adapter.base
    f64 = {n: p.detach().double() for n, p in adapter.bottleneck.named_parameters()}
    h = nn.functional.linear(x.double(), b.weight.double(), None if b.bias is None else b.bias.double())
    source = h if adapter.mode == "sequential" else x.double()
    inner = ACTS[activation](source @ f64["down.weight"].T + f64["down.bias"])
    scale = f64.get("scale", torch.tensor(adapter.bottleneck.scaling if not isinstance(adapter.bottleneck.scaling, str)
                                          else 0.0, dtype=torch.float64))
    return h + scale * (inner @ f64["up.weight"].T + f64["up.bias"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_default_init_is_exactly_the_base(dtype):
    torch.manual_seed(0)
    base = nn.Linear(24, 40).to(dtype)
    x = torch.randn(3, 5, 24, dtype=dtype)
    expected = base(x)
    adapter = Adapter(base, reduction_factor=4)
    assert adapter.bottleneck.up.weight.dtype == dtype
    assert torch.equal(adapter(x), expected)


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_identity_at_init_in_every_mode_and_scaling(mode):
    torch.manual_seed(1)
    for scaling in (1.0, 4.0, "learned", "channel"):
        base = nn.Linear(20, 20)
        x = torch.randn(4, 20)
        expected = base(x)
        assert torch.equal(Adapter(base, bottleneck=5, mode=mode, scaling=scaling)(x), expected)


@settings(max_examples=30, deadline=None)
@given(batch=st.lists(st.integers(1, 4), min_size=0, max_size=2), dim=st.integers(1, 33),
       bottleneck=st.integers(1, 17), mode=st.sampled_from(["sequential", "parallel"]),
       activation=st.sampled_from(list(ACTS)), scaling=st.sampled_from([1.0, 0.5, "learned", "channel"]),
       dtype=st.sampled_from(DTYPES))
def test_forward_and_backward_match_float64_reference(batch, dim, bottleneck, mode, activation, scaling, dtype):
    torch.manual_seed(dim * 7 + bottleneck)
    adapter = Adapter(nn.Linear(dim, dim), bottleneck=bottleneck, mode=mode, activation=activation, scaling=scaling)
    randomize(adapter)
    adapter.to(dtype)
    x = torch.randn(*batch, dim, dtype=dtype, requires_grad=True)
    out = adapter(x)
    x64 = x.detach().double().requires_grad_(True)
    expected = reference(adapter, x64, activation)
    tol = TOLERANCE[dtype] * 20  # two chained small GEMMs plus an activation: a few roundings each
    scale = expected.abs().max().item() + 1
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol * scale)
    grad = torch.randn_like(expected)
    out.backward(grad.to(dtype))
    expected.backward(grad)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=tol, atol=tol * (x64.grad.abs().max().item() + 1))


def test_parameter_count_and_only_adapter_trains():
    model = tiny_llama()
    total = sum(p.numel() for p in model.parameters())
    peftlite.inject(model, method="adapter", targets=["o_proj", "down_proj"], bottleneck=4)
    d, b, layers = 32, 4, 2
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == 2 * layers * (2 * d * b + b + d)
    assert sum(p.numel() for p in model.parameters()) == total + 2 * layers * (2 * d * b + b + d)


def test_state_dict_keys_and_paths_of_the_base_are_unchanged():
    model = tiny_llama()
    before = set(model.state_dict())
    peftlite.inject(model, method="adapter", targets=["mlp"], bottleneck=4)
    after = set(model.state_dict())
    assert before <= after
    assert after - before == {f"model.layers.{i}.mlp.adapter.default.{k}" for i in range(2)
                              for k in ("down.weight", "down.bias", "up.weight", "up.bias")}
    assert isinstance(model.get_submodule("model.layers.0.mlp.down_proj"), nn.Linear)
    assert model.model.layers[0].mlp.hidden_size == 32  # attributes read through to the base
    model.load_state_dict(model.state_dict())  # strict round trip


def test_tuple_outputs_adapt_element_zero_and_pass_the_rest():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            return self.proj(x), "kept", x.sum()

    torch.manual_seed(0)
    adapter = Adapter(Pair(), dim=8, bottleneck=2)
    randomize(adapter)
    x = torch.randn(3, 8)
    out = adapter(x)
    assert out[1] == "kept" and torch.equal(out[2], x.sum())
    assert not torch.equal(out[0], adapter.base(x)[0])


def test_llama_attention_tuple_and_houlsby_placement_train():
    model = tiny_llama()
    ids = torch.randint(0, 64, (2, 9))
    base = model(input_ids=ids).logits
    peftlite.inject(model, method="adapter", targets=["self_attn", "mlp"], reduction_factor=8, activation="silu")
    assert torch.equal(model(input_ids=ids).logits, base)  # exact at init, through tuple-returning attention
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    model.eval()
    assert not torch.equal(model(input_ids=ids).logits, base)


def test_parallel_adapter_reads_the_input():
    torch.manual_seed(0)
    base = nn.Linear(6, 6)
    adapter = Adapter(base, bottleneck=3, mode="parallel")
    randomize(adapter)
    x = torch.randn(2, 6)
    torch.testing.assert_close(adapter(x).double(), reference(adapter, x.double(), "relu"))
    assert torch.equal(adapter(input=x), adapter(x))  # keyword call: the first keyword argument


def test_device_dtype_moves_reach_base_and_adapter():
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))
    peftlite.inject(model, method="adapter", targets=["1"], dim=8, bottleneck=2)
    model.to(torch.float64)
    assert model[1].base.running_mean.dtype == torch.float64  # buffers replaced on .to() are shared
    assert model[1].bottleneck.up.weight.dtype == torch.float64
    model.train()
    model(torch.randn(4, 8, dtype=torch.float64))
    assert model[1].base.training and int(model[1].num_batches_tracked) == 1


def test_encoder_layer_fast_path_does_not_skip_adapters():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True, dropout=0.0).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        base = layer(x)
    peftlite.inject(layer, method="adapter", targets=["linear2"], bottleneck=4)
    randomize(layer.linear2)
    with torch.no_grad():
        assert not torch.allclose(layer(x), base)
    peftlite.unload(layer)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), base, rtol=0, atol=0)


def test_unload_restores_the_model_and_merge_explains():
    model = tiny_bert()
    ids = torch.randint(0, 64, (2, 7))
    keys = set(model.state_dict())
    expected = model(input_ids=ids).logits
    peftlite.inject(model, method="adapter", targets=r".*\.output\.dense", bottleneck=4)
    with pytest.raises(PeftliteError, match="cannot be merged"):
        peftlite.merge(model)
    peftlite.inject(model, rank=2, targets=["query"])  # LoRA beside adapters: merge merges what it can
    peftlite.merge(model)
    assert all(layer.merged for layer in lora_layers(model).values())
    assert peftlite.unload(model) is model
    assert set(model.state_dict()) == keys
    assert not any(isinstance(m, (Adapter, peftlite.LoRALinear)) for m in model.modules())
    torch.testing.assert_close(model(input_ids=ids).logits, expected)


@pytest.mark.parametrize("kwargs, match", [
    ({"targets": ["down_proj"], "dim": 48}, "dim=48 does not match"),
    ({"targets": ["nope"]}, "matched no module"),
    ({}, "needs targets"),
    ({"targets": ["down_proj"], "mode": "series"}, "mode='series'"),
    ({"targets": ["down_proj"], "activation": "elu"}, "activation='elu'"),
    ({"targets": ["down_proj"], "scaling": "vector"}, "scaling='vector'"),
    ({"targets": ["down_proj"], "reduction_factor": 64}, "is 0"),
    ({"targets": ["gate_proj"], "mode": "parallel"}, "needs equal sizes"),
    ({"targets": ["down_proj"], "rank": 4}, "applies to method=.lora. only"),
    ({"targets": ["down_proj"], "alpha": 4}, "unknown option"),
    ({"targets": ["model.layers.0.mlp.act_fn"]}, "cannot infer the feature size"),
])
def test_bad_inputs_raise_and_leave_model_unchanged(kwargs, match):
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(PeftliteError, match=match):
        peftlite.inject(model, method="adapter", **kwargs)
    assert_unchanged(model, before)


def test_wrong_runtime_dim_is_named():
    adapter = Adapter(nn.Identity(), dim=8, bottleneck=2)
    with pytest.raises(PeftliteError, match="has 5 features"):
        adapter(torch.randn(2, 5))


def test_adapter_twice_is_refused_unchanged():
    model = tiny_llama()
    peftlite.inject(model, method="adapter", targets=["down_proj"], bottleneck=4)
    before = snapshot(model)
    with pytest.raises(PeftliteError, match="already has"):
        peftlite.inject(model, method="adapter", targets=["down_proj"], bottleneck=4)
    assert_unchanged(model, before)
