"""inject's new options (name, adapter_dtype, trainable) and the wrapped-model entry points: bad values raise a
PeftliteError that names them, and leave the model exactly as it was."""

import pytest
import torch
from torch import nn

import peftlite
from peftlite import PeftliteError
from tests.models import TinyMLP, assert_unchanged, snapshot, tiny_bert
from tests.test_kinds import ScaledLinear


@pytest.mark.parametrize("kwargs, match", [
    ({"name": "a.b"}, "name='a.b': an adapter name"),
    ({"name": ""}, "name=''"),
    ({"name": 3}, "name=3"),
    ({"adapter_dtype": "float32"}, "adapter_dtype='float32'"),
    ({"rslora": "false"}, "rslora='false': expected True or False"),
    ({"alpha": float("inf")}, "alpha=inf: expected a finite number"),
    ({"trainable": "head"}, "trainable='head': expected a list of module names"),
    ({"trainable": ["nope"]}, "trainable entry 'nope' matched no module"),
    ({"trainable": ["norm"], "targets": ["fc1", "norm"]}, "'norm' is a trained head"),
    ({"trainable": ["head"], "targets": ["head"]}, "'head' is a trained head, saved whole"),
])
def test_bad_lora_options_raise_and_change_nothing(kwargs, match):
    model = TinyMLP()
    before = snapshot(model)
    with pytest.raises(PeftliteError, match=match):
        peftlite.inject(model, rank=2, **kwargs)
    assert_unchanged(model, before)


def test_trainable_modules_must_be_plain_and_have_parameters():
    model = peftlite.inject(TinyMLP(), rank=2, targets=["fc1"])
    before = snapshot(model)
    with pytest.raises(PeftliteError, match="'fc1' is an adapted or peftlite module"):
        peftlite.inject(model, rank=2, targets=["fc2"], trainable=["fc1"])
    holder = nn.Sequential(nn.Sequential(nn.Linear(3, 3)), nn.ReLU())
    peftlite.inject(holder, rank=2, targets=["0.0"])
    with pytest.raises(PeftliteError, match="trainable entry '0' contains adapted layers"):
        peftlite.inject(holder, method="adapter", targets=["1"], dim=3, trainable=["0"])
    with pytest.raises(PeftliteError, match=r"trainable entry '1' \(ReLU\) has no parameters"):
        peftlite.inject(nn.Sequential(nn.Linear(3, 3), nn.ReLU()), rank=2, targets=["0"], trainable=["1"])
    assert_unchanged(model, before)


def test_a_named_trainable_module_trains_is_saved_and_reloads(tmp_path):
    model = peftlite.inject(TinyMLP(), rank=2, targets=["fc1"], trainable=["norm"])
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "fc1.lora_A.default", "fc1.lora_B.default", "norm.weight", "norm.bias"]
    with torch.no_grad():
        model.norm.weight.mul_(3)
    peftlite.save_adapter(model, tmp_path)
    fresh = peftlite.load_adapter(TinyMLP(), tmp_path)
    assert torch.equal(fresh.norm.weight, model.norm.weight) and fresh.norm.weight.requires_grad
    plain = peftlite.unload(fresh)
    assert not any("_peftlite" in key for m in plain.modules() for key in m.__dict__)


def test_the_task_head_default_and_its_opt_out():
    bert = peftlite.inject(tiny_bert(), rank=2, targets=["query"])
    assert bert.classifier.weight.requires_grad
    with pytest.raises(PeftliteError, match="'classifier' is a trained head, saved whole .inject.*trainable=\\[\\]"):
        peftlite.inject(tiny_bert(), rank=2, targets=["classifier"])
    adapted = peftlite.inject(tiny_bert(), rank=2, targets=["classifier"], trainable=[])
    assert isinstance(adapted.classifier, peftlite.LoRALayer)


def test_lora_linear_takes_exact_linears_only():
    with pytest.raises(PeftliteError, match="LoRALinear adapts an nn.Linear, got ScaledLinear.*peftlite.inject"):
        peftlite.LoRALinear(ScaledLinear(3, 3))
    with pytest.raises(PeftliteError, match="got Conv2d"):
        peftlite.LoRALinear(nn.Conv2d(3, 3, 1))
    layer = peftlite.LoRALinear(nn.Linear(3, 3), rank=1)
    with pytest.raises(PeftliteError, match="already has LoRA"):
        peftlite.LoRALinear(layer)


def test_wrapped_entry_points_check_what_they_are_given(tmp_path):
    model = peftlite.inject(TinyMLP(), rank=2)
    for call in (lambda: peftlite.merge("model"), lambda: peftlite.save_adapter(42, tmp_path),
                 lambda: peftlite.load_adapter(None, tmp_path), lambda: peftlite.inject([model])):
        with pytest.raises(PeftliteError, match="expected a torch.nn.Module"):
            call()
    before = snapshot(model)
    with pytest.raises(PeftliteError, match="merge='no': expected True"):
        peftlite.unload(model, merge="no")
    with pytest.raises(PeftliteError, match="directory=3: expected a path"):
        peftlite.save_adapter(model, 3)
    with pytest.raises(PeftliteError, match="the model has no adapter named 'other'"):
        peftlite.save_adapter(model, tmp_path, name="other")
    with pytest.raises(PeftliteError, match="method='dora'"):
        peftlite.save_adapter(model, tmp_path, method="dora")
    assert_unchanged(model, before)
    assert not any(tmp_path.iterdir())
