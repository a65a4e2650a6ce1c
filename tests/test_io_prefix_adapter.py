"""save_adapter / load_adapter for prefix tuning (PEFT interop both ways) and bottleneck adapters."""

import json

import pytest
import torch

import peftlite
from peftlite import PeftliteError
from tests.models import assert_load_refused, tiny_bert, tiny_llama
from tests.test_adapter import randomize
from tests.test_prefix_tuning import gpt2

BUILDERS = {"llama": tiny_llama, "gpt2": gpt2}


def batches():
    torch.manual_seed(3)
    ids = torch.randint(1, 64, (3, 8))
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    return [{"input_ids": ids}, {"input_ids": ids, "attention_mask": mask}]


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("projection_dim", [None, 16])
def test_peftlite_prefix_loads_in_peft_with_same_logits(tmp_path, name, projection_dim):
    from peft import PeftModel

    model = BUILDERS[name]()
    peftlite.inject(model, method="prefix", prefix_len=4, projection_dim=projection_dim)
    peftlite.save_adapter(model, tmp_path)
    peft_model = PeftModel.from_pretrained(BUILDERS[name](), tmp_path).eval()
    with torch.no_grad():
        for batch in batches():
            expected = peft_model(**batch).logits
            torch.testing.assert_close(model(**batch).logits, expected, rtol=0, atol=1e-5)
            assert (expected - BUILDERS[name]()(**batch).logits).abs().max() > 1e-3  # the prefix matters


@pytest.mark.parametrize("name", list(BUILDERS))
def test_peft_prefix_loads_in_peftlite_with_same_logits(tmp_path, name):
    from peft import PrefixTuningConfig, get_peft_model

    torch.manual_seed(7)
    peft_model = get_peft_model(BUILDERS[name](), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    peft_model.eval().save_pretrained(tmp_path)
    model = peftlite.load_adapter(BUILDERS[name](), tmp_path)
    assert model.prefix_encoder["default"].prefix_len == 5
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prefix_encoder.default.prefix"]
    with torch.no_grad():
        for batch in batches():
            torch.testing.assert_close(model(**batch).logits, peft_model(**batch).logits, rtol=0, atol=1e-5)


def test_prefix_round_trip_and_refill(tmp_path):
    model = tiny_bert()
    peftlite.inject(model, method="prefix", prefix_len=3, projection_dim=6)
    peftlite.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["task_type"] == "SEQ_CLS"
    ids = torch.randint(0, 64, (2, 6))
    fresh = peftlite.load_adapter(tiny_bert(), tmp_path)
    torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-6)
    with torch.no_grad():
        fresh.prefix_encoder["default"].prefix.zero_()
    peftlite.load_adapter(fresh, tmp_path)  # the same shape: new values, no second prefix
    torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-6)


def edit(directory, **changes):
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("change, match", [
    (lambda d: edit(d, num_layers=3), "has shape"),
    (lambda d: edit(d, num_virtual_tokens=5), "has shape"),
    (lambda d: edit(d, num_attention_heads=4, token_dim=32), "has shape"),
    (lambda d: edit(d, num_transformer_submodules=2), "encoder-decoder"),
    (lambda d: edit(d, token_dim=15), "divisible"),
])
def test_bad_prefix_files_raise_and_leave_model_unchanged(tmp_path, change, match):
    source = tiny_llama()
    peftlite.inject(source, method="prefix", prefix_len=4)
    peftlite.save_adapter(source, tmp_path)
    change(tmp_path)
    assert_load_refused(tiny_llama(), tmp_path, match)


def test_prefix_for_another_model_is_named(tmp_path):
    source = tiny_llama()
    peftlite.inject(source, method="prefix", prefix_len=4)
    peftlite.save_adapter(source, tmp_path)
    assert_load_refused(tiny_llama(num_hidden_layers=3), tmp_path, "for 2 layers .* the model has 3 attention layers")


def test_adapters_round_trip(tmp_path):
    model = tiny_llama()
    peftlite.inject(model, method="adapter", targets=["o_proj"], bottleneck=4, scaling="channel")
    peftlite.inject(model, method="adapter", targets=["mlp"], bottleneck=3, mode="parallel", activation="gelu")
    for adapter in [m for m in model.modules() if isinstance(m, peftlite.Adapter)]:
        randomize(adapter)
    peftlite.save_adapter(model, tmp_path)
    ids = torch.randint(0, 64, (2, 6))
    fresh = peftlite.load_adapter(tiny_llama(), tmp_path)
    torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad}


def test_bad_adapter_file_raises_and_leaves_model_unchanged(tmp_path):
    source = tiny_llama()
    peftlite.inject(source, method="adapter", targets=["down_proj"], bottleneck=4)
    peftlite.save_adapter(source, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["modules"]["model.layers.1.mlp.down_proj"]["bottleneck"] = 5
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    assert_load_refused(tiny_llama(), tmp_path, "shape mismatch")


def test_mixed_methods_save_one_per_directory(tmp_path):
    model = tiny_llama()
    peftlite.inject(model, rank=2)
    peftlite.inject(model, method="prefix", prefix_len=2)
    with pytest.raises(PeftliteError, match="lora and prefix"):
        peftlite.save_adapter(model, tmp_path)
    peftlite.save_adapter(model, tmp_path / "lora", method="lora")
    peftlite.save_adapter(model, tmp_path / "prefix", method="prefix")
    fresh = peftlite.load_adapter(peftlite.load_adapter(tiny_llama(), tmp_path / "lora"), tmp_path / "prefix")
    ids = torch.randint(0, 64, (1, 5))
    torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
