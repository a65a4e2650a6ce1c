"""The PEFT config: target lists, rank/alpha patterns and the checks on what can be loaded."""

import re

import pytest

import peftlite
from peftlite import PeftliteError
from peftlite.lora import LoRASettings, lora_layers
from peftlite.io.lora_format import build_config, check_config, configured_targets, layer_settings, target_list
from tests.models import tiny_llama


def test_short_target_names_when_they_select_exactly_the_adapted_layers():
    model = peftlite.inject(tiny_llama(), targets=["q_proj", "o_proj"])
    assert target_list(model, set(lora_layers(model))) == ["o_proj", "q_proj"]


def test_full_names_when_short_names_would_select_more():
    model = peftlite.inject(tiny_llama(), targets=["model.layers.1.self_attn.q_proj"])
    assert target_list(model, set(lora_layers(model))) == ["model.layers.1.self_attn.q_proj"]


def test_patterns_hold_the_layers_that_differ_and_match_only_them():
    model = tiny_llama()
    peftlite.inject(model, rank=8, alpha=16, targets=["q_proj", "v_proj", "model.layers.1.mlp.up_proj"])
    peftlite.inject(model, rank=2, alpha=5, targets=["model.layers.0.mlp.up_proj"])
    config = build_config(model, lora_layers(model), "default")
    assert config["r"] == 8 and config["lora_alpha"] == 16
    assert config["rank_pattern"] == {re.escape("model.layers.0.mlp.up_proj"): 2}
    assert layer_settings(config, "model.layers.0.mlp.up_proj") == LoRASettings(2, 5.0)
    assert layer_settings(config, "model.layers.1.mlp.up_proj") == LoRASettings(8, 16.0)


def test_configured_targets_follow_peft_rules():
    model = tiny_llama()
    config = {"target_modules": ["q_proj"], "exclude_modules": ["model.layers.1.self_attn.q_proj"]}
    assert configured_targets(model, config) == {"model.layers.0.self_attn.q_proj"}
    assert configured_targets(model, {"target_modules": r".*\.1\.mlp\.(up|down)_proj"}) == {
        "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"}
    assert len(configured_targets(model, {"target_modules": "all-linear"})) == 14


@pytest.mark.parametrize("config, match", [
    ([], "expected a JSON object"), ({"peft_type": "IA3"}, "peft_type is 'IA3'"),
    ({"peft_type": "LORA", "r": 0}, "rank=0"), ({"peft_type": "LORA", "lora_alpha": -2}, "alpha=-2"),
    ({"peft_type": "LORA", "layers_to_transform": [0]}, "layers_to_transform"),
    ({"peft_type": "LORA", "fan_in_fan_out": "yes"}, "fan_in_fan_out"),
    ({"peft_type": "LORA", "use_rslora": "false"}, "rslora='false'"),
    ({"peft_type": "LORA", "rank_pattern": {"q_proj": 0}}, r"rank_pattern\['q_proj'\] = 0"),
    ({"peft_type": "LORA", "alpha_pattern": {"q_proj": -1}}, r"alpha_pattern\['q_proj'\] = -1"),
    ({"peft_type": "LORA", "alpha_pattern": {"(": 2}}, "not a valid regular expression"),
    ({"peft_type": "LORA", "target_modules": 5}, "target_modules=5"),
])
def test_unsupported_configs_are_named(config, match):
    with pytest.raises(PeftliteError, match=match):
        check_config(config, "adapter_config.json")
