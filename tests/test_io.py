"""save_adapter / load_adapter: round trips, interop with real PEFT both ways, strict errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import peftlite
from peftlite import PeftliteError
from peftlite.lora import lora_layers
from tests.models import (assert_load_refused, assert_unchanged, injected_llama, randomize_lora, snapshot, tiny_bert,
                          tiny_llama)

peft = pytest.importorskip("peft")

IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
MASK = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])


def outputs(model):
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits


def peft_model(base, **config):
    model = peft.get_peft_model(base, peft.LoraConfig(**config))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return model.eval()


def test_round_trip(tmp_path):
    model = injected_llama(rank=4, alpha=12)
    expected = outputs(model)
    peftlite.save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    fresh = peftlite.load_adapter(tiny_llama(), tmp_path)
    torch.testing.assert_close(outputs(fresh), expected, rtol=0, atol=0)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad}


def test_file_layout_is_peft_format(tmp_path):
    model = injected_llama(rank=4, targets=["q_proj", "v_proj"], dropout=0.05, rslora=True)
    peftlite.save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 32)
    assert tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"].shape == (16, 4)
    assert len(tensors) == 8
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 4
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["use_rslora"] is True
    assert config["lora_dropout"] == 0.05 and config["bias"] == "none" and config["fan_in_fan_out"] is False


@pytest.mark.parametrize("make", [tiny_llama, tiny_bert])
def test_peftlite_adapter_loads_in_peft_with_same_outputs(tmp_path, make):
    model = peftlite.inject(make(), rank=4, alpha=8, rslora=make is tiny_bert)
    randomize_lora(model)
    expected = outputs(model)
    assert not torch.equal(expected, outputs(make()))
    peftlite.save_adapter(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(make(), tmp_path).eval()
    torch.testing.assert_close(outputs(loaded), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [tiny_llama, tiny_bert])
def test_peft_adapter_loads_in_peftlite_with_same_outputs(tmp_path, make):
    targets = ["q_proj", "v_proj", "down_proj"] if make is tiny_llama else ["query", "value", "dense"]
    reference = peft_model(make(), r=6, lora_alpha=10, target_modules=targets, use_rslora=True,
                           rank_pattern={targets[-1]: 3}, alpha_pattern={targets[0]: 20})
    reference.save_pretrained(tmp_path)
    model = peftlite.load_adapter(make(), tmp_path)
    layers = lora_layers(model)
    assert {layer.lora_settings["default"].rank for name, layer in layers.items() if name.endswith(targets[-1])} == {3}
    assert {layer.lora_settings["default"].alpha for name, layer in layers.items()
            if name.endswith(targets[0])} == {20.0}
    torch.testing.assert_close(outputs(model), outputs(reference), rtol=1e-5, atol=1e-6)


def test_peftlite_mixed_ranks_round_trip_through_peft(tmp_path):
    model = tiny_llama()
    peftlite.inject(model, rank=4, alpha=8, targets=["q_proj", "k_proj"])
    peftlite.inject(model, rank=2, alpha=3, targets=["up_proj"])
    randomize_lora(model)
    peftlite.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 4 and set(config["rank_pattern"].values()) == {2}
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(outputs(loaded), outputs(model), rtol=1e-5, atol=1e-6)


def test_load_into_already_injected_model(tmp_path):
    source = injected_llama(rank=4, alpha=8)
    peftlite.save_adapter(source, tmp_path)
    target = peftlite.inject(tiny_llama(), rank=4)
    peftlite.load_adapter(target, tmp_path)
    torch.testing.assert_close(outputs(target), outputs(source), rtol=0, atol=0)


def saved(tmp_path, **inject):
    peftlite.save_adapter(injected_llama(**inject), tmp_path)
    return tmp_path


def edit_weights(directory, edit):
    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


Q = "base_model.model.model.layers.0.self_attn.q_proj"
BAD_FILES = {
    "missing key": (lambda d: edit_weights(d, lambda t: t.pop(f"{Q}.lora_B.weight")), f"missing key '{Q}.lora_B"),
    "missing layer": (lambda d: edit_weights(d, lambda t: [t.pop(f"{Q}.lora_{p}.weight") for p in "AB"]),
                      f"missing key '{Q}.lora_A"),
    "unexpected key": (lambda d: edit_weights(d, lambda t: t.update({f"{Q}.lora_A.bias": torch.zeros(4)})),
                       "unexpected key"),
    "unknown module": (lambda d: edit_weights(d, lambda t: t.update({
        "base_model.model.model.nope.lora_A.weight": torch.zeros(4, 32),
        "base_model.model.model.nope.lora_B.weight": torch.zeros(32, 4)})), "no module 'model.nope'"),
    "shape mismatch": (lambda d: edit_weights(d, lambda t: t.update({f"{Q}.lora_A.weight": torch.zeros(4, 31)})),
                       "shape mismatch for layer 'model.layers.0.self_attn.q_proj'"),
    "rank vs config": (lambda d: edit_config(d, r=8), "shape mismatch"),
    "corrupt weights": (lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10),
                        "not a readable safetensors file"),
    "truncated weights": (lambda d: (d / "adapter_model.safetensors").write_bytes(
        (d / "adapter_model.safetensors").read_bytes()[:-100]), "adapter_model.safetensors"),
    "corrupt config": (lambda d: (d / "adapter_config.json").write_text("{not json"), "not readable JSON"),
    "no weights": (lambda d: (d / "adapter_model.safetensors").unlink(), "no such file"),
    "pickle only": (lambda d: ((d / "adapter_model.safetensors").rename(d / "adapter_model.bin")), "pickle"),
    "no config": (lambda d: (d / "adapter_config.json").unlink(), "adapter_config.json: no such file"),
    "other type": (lambda d: edit_config(d, peft_type="IA3"), "peft_type is 'IA3'"),
    "prefix tuning": (lambda d: edit_config(d, peft_type="PREFIX_TUNING"), "exactly one tensor 'prompt_embeddings'"),
    "dora": (lambda d: edit_config(d, use_dora=True), "use_dora"),
    "bias": (lambda d: edit_config(d, bias="all"), "bias='all'"),
    "pissa": (lambda d: edit_config(d, init_lora_weights="pissa"), "rewrites the base weights"),
    "targets more": (lambda d: edit_config(d, target_modules=["q_proj", "v_proj", "lm_head"]), "missing key"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_files_raise_and_leave_model_unchanged(tmp_path, case):
    corrupt, match = BAD_FILES[case]
    corrupt(saved(tmp_path, targets=["q_proj", "v_proj"]))
    model = tiny_llama()
    assert_load_refused(model, tmp_path, match)


def test_model_lora_layers_missing_from_file_raise(tmp_path):
    saved(tmp_path, targets=["q_proj"])
    model = peftlite.inject(tiny_llama(), rank=4, targets=["q_proj", "v_proj"])
    assert_load_refused(model, tmp_path, "v_proj.lora_A")


def test_rank_of_existing_layer_must_match(tmp_path):
    saved(tmp_path, rank=4)
    model = peftlite.inject(tiny_llama(), rank=2)
    assert_load_refused(model, tmp_path, "shape mismatch|rank 2")


def test_save_refuses_settings_the_format_cannot_hold(tmp_path):
    model = tiny_llama()
    peftlite.inject(model, targets=["q_proj"], rslora=True)
    peftlite.inject(model, targets=["v_proj"], rslora=False)
    with pytest.raises(PeftliteError, match="one use_rslora"):
        peftlite.save_adapter(model, tmp_path)
    assert not (tmp_path / "adapter_model.safetensors").exists()


def test_save_while_merged_saves_the_adapter(tmp_path):
    model = injected_llama()
    expected = outputs(model)
    peftlite.merge(model)
    peftlite.save_adapter(model, tmp_path)
    torch.testing.assert_close(outputs(peftlite.load_adapter(tiny_llama(), tmp_path)), expected)


def test_load_on_a_16_bit_model_gives_float32_adapters_with_the_file_values(tmp_path):
    source = injected_llama()
    peftlite.save_adapter(source, tmp_path)
    model = peftlite.load_adapter(tiny_llama().to(torch.bfloat16), tmp_path)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].dtype == torch.float32
    assert torch.equal(layer.lora_B["default"], source.model.layers[0].self_attn.q_proj.lora_B["default"].detach())


def test_peft_classifier_adapter_with_modules_to_save_loads(tmp_path):
    reference = peft_model(tiny_bert(), task_type="SEQ_CLS", r=4, target_modules=["query", "value"])
    with torch.no_grad():
        reference.base_model.model.classifier.modules_to_save["default"].weight.normal_(0, 0.5)
    reference.save_pretrained(tmp_path)
    model = peftlite.load_adapter(tiny_bert(), tmp_path)
    torch.testing.assert_close(outputs(model), outputs(reference), rtol=1e-5, atol=1e-6)
    assert not torch.equal(outputs(model), outputs(tiny_bert()))
    assert model.classifier.weight.requires_grad and model.classifier.bias.requires_grad
    assert not model.bert.embeddings.word_embeddings.weight.requires_grad


def test_unfrozen_head_is_saved_whole_and_peft_reads_it(tmp_path):
    model = peftlite.inject(tiny_bert(), rank=4)
    model.classifier.requires_grad_(True)  # train the new head along with the adapter
    randomize_lora(model)
    with torch.no_grad():
        model.classifier.weight.normal_(0, 0.5)
    expected = outputs(model)
    peftlite.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"]
    assert "base_model.model.classifier.weight" in load_file(tmp_path / "adapter_model.safetensors")
    torch.testing.assert_close(outputs(peft.PeftModel.from_pretrained(tiny_bert(), tmp_path).eval()), expected,
                               rtol=1e-5, atol=1e-6)
    reloaded = peftlite.load_adapter(tiny_bert(), tmp_path)
    torch.testing.assert_close(outputs(reloaded), expected, rtol=0, atol=0)
    assert reloaded.classifier.weight.requires_grad


def test_saved_module_errors(tmp_path):
    model = peftlite.inject(tiny_bert(), rank=4)
    model.classifier.requires_grad_(True)
    peftlite.save_adapter(model, tmp_path)
    edit_weights(tmp_path, lambda t: t.update({"base_model.model.classifier.weight": torch.zeros(3, 31)}))
    fresh = tiny_bert()
    before = snapshot(fresh)
    with pytest.raises(PeftliteError, match="shape mismatch for 'base_model.model.classifier.weight'"):
        peftlite.load_adapter(fresh, tmp_path)
    edit_weights(tmp_path, lambda t: t.pop("base_model.model.classifier.weight"))
    with pytest.raises(PeftliteError, match="missing key 'base_model.model.classifier.weight'"):
        peftlite.load_adapter(fresh, tmp_path)
    assert_unchanged(fresh, before)


def test_trainable_weights_the_format_cannot_hold_refuse_to_save(tmp_path):
    model = peftlite.inject(tiny_llama(), rank=4)
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(True)
    with pytest.raises(PeftliteError, match="base weight or bias of LoRA layer 'model.layers.0.self_attn.q_proj'"):
        peftlite.save_adapter(model, tmp_path)
    block = torch.nn.Module()
    block.scale = torch.nn.Parameter(torch.ones(4))
    block.fc = torch.nn.Linear(4, 4)
    model = peftlite.inject(torch.nn.Sequential(block), rank=2)
    block.scale.requires_grad_(True)  # a parameter of a module that also has submodules
    with pytest.raises(PeftliteError, match="'0' has trainable parameters of its own and submodules"):
        peftlite.save_adapter(model, tmp_path)
