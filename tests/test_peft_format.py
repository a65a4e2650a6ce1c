"""The PEFT config: target lists, rank/alpha patterns and the checks on what can be loaded."""

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import peftlite
from peftlite import PeftliteError
from peftlite.lora import LoRASettings, lora_layers
from peftlite.io.lora_format import (build_config, check_config, common_and_pattern, configured_targets,
                                     layer_settings, pattern_value, target_list)
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
    assert config["rank_pattern"] == {"^" + re.escape("model.layers.0.mlp.up_proj"): 2}
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


class Nested(torch.nn.Module):
    """A top-level ``fc`` beside ``block.fc``: PEFT's pattern rule ``(.*\\.)?key$`` with key ``fc`` matches both."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(6, 6)
        self.block = torch.nn.Module()
        self.block.fc = torch.nn.Linear(6, 6)
        self.block.out = torch.nn.Linear(6, 6)

    def forward(self, x):
        return self.block.out(self.block.fc(self.fc(x)))


@pytest.mark.parametrize("differ", ["alpha", "rank"])
def test_pattern_keys_match_exactly_one_layer_in_peftlite_and_peft(differ, tmp_path):
    """The odd layer is the top-level ``fc``: a key ``fc`` would give ``block.fc`` its alpha (or rank)."""
    from peft import PeftModel

    model = Nested()
    peftlite.inject(model, rank=3 if differ == "rank" else 2, alpha=32, targets=["fc"], exclude=["block.fc"])
    peftlite.inject(model, rank=2, alpha=8, targets=["block.fc", "block.out"])
    config = build_config(model, lora_layers(model), "default")
    assert list(config[f"{differ}_pattern"]) == ["^fc"]
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B["default"].copy_(torch.randn(layer.lora_B["default"].shape, generator=generator))
    x = torch.randn(4, 6, generator=generator)
    expected = model(x)
    peftlite.save_adapter(model, tmp_path)
    ours = peftlite.load_adapter(Nested(), tmp_path)
    theirs = PeftModel.from_pretrained(Nested(), tmp_path).eval()
    torch.testing.assert_close(ours(x), expected)
    torch.testing.assert_close(theirs(x), expected)


@given(st.dictionaries(st.lists(st.sampled_from(["fc", "a", "block", "0", "q_proj", "x.y"]), min_size=1, max_size=4)
                       .map(".".join), st.sampled_from([1.0, 2.0, 8.0, 32.0]), min_size=1, max_size=8))
@settings(max_examples=200, deadline=None)
def test_every_pattern_key_gives_its_own_layer_its_value(values):
    """Module paths drawn so that one is often a dotted suffix of another (``fc``, ``block.fc``) or contains regex
    characters (``x.y``): the written patterns give every layer exactly its own value, by PEFT's matching rule."""
    common, pattern = common_and_pattern(values)
    for path, value in values.items():
        assert pattern_value(pattern, path, common) == value, (path, pattern)
