"""Several adapters on disk: PEFT's multi-adapter layout both ways, loading all or one, hot swapping in place."""

import json

import pytest
import torch

import peftlite
from peftlite import PeftliteError
from tests.models import assert_load_refused, assert_unchanged, snapshot, tiny_bert, tiny_llama

peft = pytest.importorskip("peft")

IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def randomize(model, seed=7):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)


def two_adapter_llama(names=("default", "b")):
    model = tiny_llama()
    peftlite.inject(model, rank=4, alpha=8, name=names[0])
    peftlite.inject(model, rank=2, targets=["q_proj", "v_proj"], name=names[1], rslora=True)
    randomize(model)
    return model


def per_adapter(model, names):
    found = {}
    for name in names:
        peftlite.set_adapter(model, name)
        found[name] = logits(model)
    return found


def files(directory):
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def test_layouts_one_adapter_at_the_root_several_as_peft_writes_them(tmp_path):
    model = tiny_llama()
    peftlite.inject(model, rank=2, name="only")
    peftlite.save_adapter(model, tmp_path / "one")
    assert files(tmp_path / "one") == ["adapter_config.json", "adapter_model.safetensors"]
    model = two_adapter_llama()
    peftlite.save_adapter(model, tmp_path / "two")
    assert files(tmp_path / "two") == ["adapter_config.json", "adapter_model.safetensors", "b/adapter_config.json",
                                       "b/adapter_model.safetensors"]
    assert json.loads((tmp_path / "two" / "b" / "adapter_config.json").read_text())["target_modules"] == [
        "q_proj", "v_proj"]
    peftlite.save_adapter(model, tmp_path / "just_b", name="b")
    assert files(tmp_path / "just_b") == ["adapter_config.json", "adapter_model.safetensors"]
    model = two_adapter_llama(names=("x", "y"))
    peftlite.save_adapter(model, tmp_path / "named")
    assert files(tmp_path / "named") == ["x/adapter_config.json", "x/adapter_model.safetensors",
                                         "y/adapter_config.json", "y/adapter_model.safetensors"]


def test_round_trip_loads_all_or_one_by_name(tmp_path):
    model = two_adapter_llama()
    expected = per_adapter(model, ["default", "b"])
    peftlite.save_adapter(model, tmp_path)
    fresh = peftlite.load_adapter(tiny_llama(), tmp_path)
    assert peftlite.adapter_names(fresh) == ["default", "b"]
    for name, value in per_adapter(fresh, ["default", "b"]).items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0)
    one = peftlite.load_adapter(tiny_llama(), tmp_path, name="b")
    assert peftlite.adapter_names(one) == ["b"]
    torch.testing.assert_close(logits(one), expected["b"], rtol=0, atol=0)
    renamed = peftlite.load_adapter(tiny_llama(), tmp_path / "b", name="task")
    torch.testing.assert_close(logits(renamed), expected["b"], rtol=0, atol=0)


def test_a_peft_model_with_two_adapters_loads_into_peftlite(tmp_path):
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"]))
    theirs.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=3, target_modules=["v_proj"], use_rslora=True))
    randomize(theirs)
    theirs.eval()
    expected = {}
    for name in ("default", "other"):
        theirs.set_adapter(name)
        expected[name] = logits(theirs)
    theirs.save_pretrained(tmp_path)
    ours = peftlite.load_adapter(tiny_llama(), tmp_path)
    for name, value in per_adapter(ours, ["default", "other"]).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-5)
    other = peftlite.load_adapter(tiny_llama(), tmp_path, name="other")
    torch.testing.assert_close(logits(other), expected["other"], rtol=1e-5, atol=1e-5)


def test_a_peftlite_multi_adapter_directory_loads_into_peft(tmp_path):
    model = two_adapter_llama()
    expected = per_adapter(model, ["default", "b"])
    peftlite.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    theirs.load_adapter(tmp_path / "b", adapter_name="b")
    for name in ("default", "b"):
        theirs.set_adapter(name)
        torch.testing.assert_close(logits(theirs), expected[name], rtol=1e-5, atol=1e-5)


def test_a_trained_head_is_saved_in_every_adapter_directory(tmp_path):
    model = tiny_bert()
    peftlite.inject(model, rank=2, name="default")
    peftlite.inject(model, rank=2, name="b", targets=["query"])
    peftlite.save_adapter(model, tmp_path)
    for folder in (tmp_path, tmp_path / "b"):
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["modules_to_save"] == ["classifier"]


def test_hot_swap_replaces_values_in_place_and_folds_a_different_alpha_into_B(tmp_path):
    donor = tiny_llama()
    peftlite.inject(donor, rank=4, alpha=16, name="a", targets=["q_proj", "v_proj"])
    randomize(donor, seed=11)
    expected = logits(donor)
    peftlite.save_adapter(donor, tmp_path)
    model = tiny_llama()
    peftlite.inject(model, rank=4, alpha=4, name="a", targets=["q_proj", "v_proj"])
    layer = model.model.layers[0].self_attn.q_proj
    params = (layer.lora_A["a"], layer.lora_B["a"])
    settings = layer.lora_settings["a"]
    peftlite.load_adapter(model, tmp_path, name="a")
    assert (layer.lora_A["a"], layer.lora_B["a"]) == params and layer.lora_settings["a"] is settings
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-6)
    peftlite.save_adapter(model, tmp_path / "again")  # what is saved is what is computed
    torch.testing.assert_close(logits(peftlite.load_adapter(tiny_llama(), tmp_path / "again")), expected,
                               rtol=1e-5, atol=1e-6)


def test_hot_swap_refuses_another_rank_or_target_set_changing_nothing(tmp_path):
    donor = tiny_llama()
    peftlite.inject(donor, rank=4, name="a", targets=["q_proj", "v_proj", "o_proj"])
    peftlite.save_adapter(donor, tmp_path / "wider")
    donor = tiny_llama()
    peftlite.inject(donor, rank=2, name="a", targets=["q_proj", "v_proj"])
    peftlite.save_adapter(donor, tmp_path / "rank2")
    model = tiny_llama()
    peftlite.inject(model, rank=4, name="a", targets=["q_proj", "v_proj"])
    before = snapshot(model)
    with pytest.raises(PeftliteError, match="already holds adapter 'a'.*also adapts '.*o_proj'"):
        peftlite.load_adapter(model, tmp_path / "wider", name="a")
    assert_unchanged(model, before)
    with pytest.raises(PeftliteError, match="already has adapter 'a' of rank 4, the file has rank 2"):
        peftlite.load_adapter(model, tmp_path / "rank2", name="a")
    assert_unchanged(model, before)


def test_loading_several_checks_every_folder_before_changing_the_model(tmp_path):
    model = two_adapter_llama()
    peftlite.save_adapter(model, tmp_path)
    (tmp_path / "b" / "adapter_model.safetensors").write_bytes(b"broken")
    assert_load_refused(tiny_llama(), tmp_path, "b/adapter_model.safetensors: not a readable safetensors file")
    (tmp_path / "b").rename(tmp_path / "b.v2")
    assert_load_refused(tiny_llama(), tmp_path, "folder name cannot be an adapter name")


def test_bottleneck_adapters_by_name_round_trip(tmp_path):
    model = tiny_llama()
    peftlite.inject(model, method="adapter", targets=["o_proj"], name="default", bottleneck=4)
    peftlite.inject(model, method="adapter", targets=["o_proj", "down_proj"], name="b", bottleneck=3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".up." in name:
                p.normal_(0, 0.2)
    expected = per_adapter(model, ["default", "b"])
    peftlite.save_adapter(model, tmp_path)
    fresh = peftlite.load_adapter(tiny_llama(), tmp_path)
    for name, value in per_adapter(fresh, ["default", "b"]).items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0)
