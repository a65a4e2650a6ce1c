"""inject / merge / unmerge / unload over whole models, and the guarantee that failures change nothing."""

import pytest
import torch
from torch import nn

import peftlite
from peftlite import LoRALinear, PeftliteError
from peftlite.ops.exact_merge import _BITS
from peftlite.lora import lora_layers
from tests.models import (TinyMLP, assert_close_scaled, assert_unchanged, injected_llama, randomize_lora, snapshot,
                          tiny_bert, tiny_llama)

IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_inject_wraps_targets_keeps_keys_and_freezes_the_rest():
    model = tiny_llama()
    keys = set(model.state_dict())
    assert peftlite.inject(model, rank=4, alpha=8) is model
    layers = lora_layers(model)
    assert len(layers) == 14 and isinstance(model.lm_head, nn.Linear)
    new_keys = set(model.state_dict())
    assert keys <= new_keys and all("lora" in k for k in new_keys - keys)
    assert new_keys - keys == {f"{n}.{p}" for n in layers for p in ("lora_A.default", "lora_B.default")}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == new_keys - keys


def test_original_checkpoint_loads_into_injected_model():
    original = tiny_llama(seed=3).state_dict()
    model = peftlite.inject(tiny_llama(seed=0), rank=4)
    missing, unexpected = model.load_state_dict(original, strict=False)
    assert unexpected == [] and all("lora" in k for k in missing)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, original[key])


def test_injected_model_starts_equal_to_base_and_trains_only_adapters():
    base = tiny_llama()
    expected = logits(base)
    model = peftlite.inject(tiny_llama(), rank=4, dropout=0.1)
    assert torch.equal(logits(model), expected)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora" not in k}
    adapters = {k: v.clone() for k, v in model.state_dict().items() if "lora" in k}
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    assert all(not torch.equal(after[k], v) for k, v in adapters.items())


@pytest.mark.parametrize("kwargs, match", [
    ({"rank": 0}, "rank=0"), ({"alpha": 0}, "alpha=0"), ({"dropout": 1.0}, "dropout=1.0"),
    ({"targets": ["q_projj"]}, "Modules that look close: q_proj"),
    ({"targets": ["self_attn"]}, "LlamaAttention, which LoRA does not support"),
    ({"targets": ["q_proj", "input_layernorm"]}, "LlamaRMSNorm"), ({"init": "olora"}, "init="),
])
def test_bad_inject_raises_and_leaves_model_unchanged(kwargs, match):
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(PeftliteError, match=match):
        peftlite.inject(model, **{"rank": 4, **kwargs})
    assert_unchanged(model, before)


def test_injecting_twice_is_an_error_and_changes_nothing():
    model = injected_llama(targets=["q_proj"])
    before = snapshot(model)
    with pytest.raises(PeftliteError, match="already has a LoRA adapter named 'default'"):
        peftlite.inject(model, targets=["q_proj", "v_proj"])
    assert_unchanged(model, before)
    peftlite.inject(model, targets=["v_proj"])  # other layers may be added later
    assert len(lora_layers(model)) == 4
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora" in n)


def test_module_reachable_under_two_names_gets_one_wrapper():
    shared = nn.Linear(6, 6)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    peftlite.inject(model, rank=2)
    assert isinstance(model[0], LoRALinear) and model[0] is model[2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_unmerge_over_model_is_exact_and_consistent(dtype):
    model = injected_llama().to(dtype)
    base = tiny_llama().to(dtype)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    unmerged = logits(model)
    assert not torch.equal(unmerged, logits(base))  # the adapter does something
    peftlite.merge(model)
    peftlite.merge(model)
    assert all(layer.merged for layer in lora_layers(model).values())
    assert_close_scaled(logits(model), unmerged, dtype)
    for _ in range(100):
        peftlite.unmerge(model)
        peftlite.merge(model)
    peftlite.unmerge(model)
    peftlite.unmerge(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value.view(_BITS[value.dtype]), weights[key].view(_BITS[value.dtype])), key
    assert torch.equal(logits(model), unmerged)


def test_merge_with_one_bad_layer_changes_no_layer():
    model = injected_llama().to(torch.float16)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.lora_A["default"].fill_(300.0)
        model.model.layers[1].mlp.down_proj.lora_B["default"].fill_(300.0)  # 300 * 300 * rank 4 * scaling 1 > float16 max
    before = snapshot(model)
    with pytest.raises(PeftliteError, match="model.layers.1.mlp.down_proj"):
        peftlite.merge(model)
    assert_unchanged(model, before)
    assert not any(layer.merged for layer in lora_layers(model).values())


def test_unload_merged_gives_original_keys_and_loads_strictly_into_original_class():
    model = injected_llama()
    keys = {k: v.shape for k, v in tiny_llama().state_dict().items()}
    expected = logits(model)
    plain = peftlite.unload(model)
    assert plain is model and not lora_layers(model)
    assert {k: v.shape for k, v in model.state_dict().items()} == keys
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("proj"))
    fresh = tiny_llama(seed=5)
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert_close_scaled(logits(fresh), expected, torch.float32)


def test_unload_without_merge_restores_the_base_model():
    model = injected_llama()
    peftlite.merge(model)
    peftlite.unload(model, merge=False)
    base = tiny_llama()
    for key, value in base.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)


def test_unload_a_lone_layer_returns_a_linear():
    layer = LoRALinear(nn.Linear(4, 3), rank=2)
    plain = peftlite.unload(layer)
    assert type(plain) is nn.Linear and plain.weight is layer.weight


def test_functions_on_a_model_without_lora_raise():
    for fn in (peftlite.merge, peftlite.unmerge, peftlite.unload):
        with pytest.raises(PeftliteError, match="no LoRA layers"):
            fn(TinyMLP())


def test_training_while_merged_is_an_error():
    model = injected_llama()
    peftlite.merge(model)
    model.train()
    with pytest.raises(PeftliteError, match="unmerge"):
        model(IDS, labels=IDS)


def test_bert_inject_merge_unload():
    model = tiny_bert()
    peftlite.inject(model, rank=4)
    randomize_lora(model)
    assert "classifier" not in lora_layers(model)
    ids = IDS
    with torch.no_grad():
        before = model(ids).logits
        peftlite.merge(model)
        assert_close_scaled(model(ids).logits, before, torch.float32)
        peftlite.unload(model)
        assert_close_scaled(model(ids).logits, before, torch.float32)


def test_unloaded_model_exports_with_save_pretrained(tmp_path):
    from transformers import LlamaForCausalLM

    model = injected_llama()
    expected = logits(model)
    peftlite.unload(model).save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert_close_scaled(logits(reloaded), expected, torch.float32)
