"""Regression tests: silent failures a review and new users found in the single-wrapper design, one test each."""

import json

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

import peftlite
from peftlite import PeftliteError
from tests.models import assert_load_refused, assert_unchanged, snapshot, tiny_bert, tiny_llama
from tests.test_kinds import ScaledLinear
from tests.test_peft_kinds import gpt2


class Tied(nn.Module):
    """Two Linears holding one weight Parameter (tied weights), with biases of their own."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(6, 6), nn.Linear(6, 6)
        self.second.weight = self.first.weight

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def nonzero_b(model):
    with torch.no_grad():
        for layer in peftlite.lora.lora_layers(model).values():
            for b in layer.lora_B.values():
                b.normal_(0, 0.5)


def test_a_linear_subclass_keeps_its_buffer_forward_and_hooks():
    model = nn.Sequential(ScaledLinear(5, 4), nn.ReLU())
    x = torch.randn(3, 5)
    expected, keys = model(x), set(model.state_dict())
    seen = []
    model[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    peftlite.inject(model, targets=["0"])
    assert "0.scale" in model.state_dict() and set(model.state_dict()) - keys == {"0.lora_A.default",
                                                                                    "0.lora_B.default"}
    assert torch.equal(model(x), expected) and seen == [(3, 5)]
    plain = peftlite.unload(model, merge=False)
    assert type(plain[0]) is ScaledLinear and set(plain.state_dict()) == keys and torch.equal(plain(x), expected)


def test_tied_linears_stay_exact_unmerged_and_merge_refuses_naming_both():
    model = peftlite.inject(Tied(), rank=2, targets=["first", "second"])
    nonzero_b(model)
    x = torch.randn(4, 6)
    w = model.first.weight.detach()
    delta = {n: m.delta_weight() for n, m in (("first", model.first), ("second", model.second))}
    h = torch.relu(x @ (w + delta["first"]).T + model.first.bias)
    torch.testing.assert_close(model(x), h @ (w + delta["second"]).T + model.second.bias)
    before = snapshot(model)
    with pytest.raises(PeftliteError, match="'first' is shared with 'second.weight'"):
        peftlite.merge(model)
    assert_unchanged(model, before)


def test_tied_input_and_output_embeddings_refuse_merge():
    model = peftlite.inject(gpt2(), rank=2, targets=["wte"])
    assert model.lm_head.weight is model.transformer.wte.weight
    with pytest.raises(PeftliteError, match="'transformer.wte' is shared with 'lm_head.weight'"):
        peftlite.merge(model)


def test_load_adapter_refuses_multihead_attention_out_proj_as_inject_does(tmp_path):
    model = nn.Sequential(nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16))
    with pytest.raises(PeftliteError, match="belongs to an nn.MultiheadAttention"):
        peftlite.inject(model, targets=["out_proj"])
    key = "base_model.model.0.self_attn.out_proj"
    save_file({f"{key}.lora_A.weight": torch.randn(2, 8), f"{key}.lora_B.weight": torch.randn(8, 2)},
              tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2,
                                                              "target_modules": ["out_proj"]}))
    assert_load_refused(model, tmp_path, "adapter_model.safetensors: key .*out_proj.lora_A.weight.*MultiheadAttention")


def test_a_second_inject_never_adapts_peftlite_modules():
    model = tiny_llama()
    peftlite.inject(model, method="prefix", prefix_len=2, projection_dim=8)
    peftlite.inject(model, method="adapter", targets=["model.layers.0.mlp"])
    peftlite.inject(model, rank=2)
    adapted = [n for n, m in model.named_modules() if isinstance(m, peftlite.LoRALayer)]
    assert adapted and not [n for n in adapted if "prefix_encoder" in n or ".adapter." in n]
    assert all(p.requires_grad for p in model.prefix_encoder["default"].parameters())


def test_a_failing_load_changes_nothing_and_names_the_file(tmp_path):
    source = peftlite.inject(tiny_llama(), rank=2, targets=["q_proj"])
    peftlite.save_adapter(source, tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "alpha_pattern": {"q_proj": 0}}))
    model = tiny_llama()  # nothing frozen yet: a load that fails must not freeze it
    assert_load_refused(model, tmp_path, r"adapter_config.json: alpha_pattern\['q_proj'\] = 0")
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("width", [8, 5])  # 8: width equals the channel count, which once hid the bug
def test_a_bottleneck_around_a_conv_acts_on_channels(width):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    model = peftlite.inject(nn.Sequential(conv), method="adapter", targets=["0"], reduction_factor=4)
    bottleneck = model[0].bottleneck
    with torch.no_grad():
        bottleneck.up.weight.normal_()
    x = torch.randn(2, 3, 6, width)
    h = torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=1)
    channels_last = h.permute(0, 2, 3, 1)  # [B, H, W, C]
    update = bottleneck.up(torch.relu(bottleneck.down(channels_last))).permute(0, 3, 1, 2)
    torch.testing.assert_close(model(x), h + update)


def test_adamw_on_a_bf16_base_updates_every_element_of_lora_a():
    model = tiny_llama().to(torch.bfloat16)
    peftlite.inject(model, rank=4)
    nonzero_b(model)  # a trained-looking B, so A has a gradient
    layer = model.model.layers[0].self_attn.q_proj
    before = layer.lora_A["default"].detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 64, (2, 9))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    changed = (layer.lora_A["default"] != before).float().mean().item()
    assert layer.lora_A["default"].dtype == torch.float32 and changed >= 0.99


def test_bert_classifier_head_trains_and_reloads_to_the_same_predictions(tmp_path):
    model = peftlite.inject(tiny_bert(), rank=4, targets=["query", "value"])
    assert model.classifier.weight.requires_grad and model.classifier.bias.requires_grad
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids, labels = torch.randint(0, 64, (4, 7)), torch.tensor([0, 1, 2, 1])
    head = model.classifier.weight.detach().clone()
    for _ in range(3):
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.equal(model.classifier.weight, head)
    peftlite.save_adapter(model.eval(), tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]
    fresh = peftlite.load_adapter(tiny_bert(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    assert fresh.classifier.weight.requires_grad
    untrained = peftlite.inject(tiny_bert(), rank=4, targets=["query"], trainable=[])
    assert not untrained.classifier.weight.requires_grad


@pytest.fixture
def process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def lora_keys(directory):
    from safetensors import safe_open

    with safe_open(str(directory / "adapter_model.safetensors"), "pt") as f:
        return sorted(f.keys())


def test_wrapped_models_save_load_and_merge_with_the_bare_keys(tmp_path, process_group):
    bare = peftlite.inject(tiny_llama(), rank=2, targets=["q_proj"])
    peftlite.save_adapter(bare, tmp_path / "bare")
    ddp = nn.parallel.DistributedDataParallel(bare)
    for wrapped, name in ((ddp, "ddp"), (torch.compile(bare), "compiled"), (torch.compile(ddp), "both")):
        peftlite.save_adapter(wrapped, tmp_path / name)
        assert lora_keys(tmp_path / name) == lora_keys(tmp_path / "bare")
        assert lora_keys(tmp_path / name)[0].startswith("base_model.model.model.layers.0")
    fresh = nn.parallel.DistributedDataParallel(peftlite.inject(tiny_llama(), rank=2, targets=["q_proj"]))
    peftlite.load_adapter(fresh, tmp_path / "ddp")
    peftlite.merge(fresh)
    peftlite.unmerge(fresh)
    plain = peftlite.unload(torch.compile(fresh))
    assert type(plain.model.layers[0].self_attn.q_proj) is nn.Linear


def llama_classifier(seed: int = 0):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    return LlamaForSequenceClassification(config).eval()


def test_a_prefix_on_a_classifier_saves_and_reloads_its_trained_head(tmp_path):
    """Prefix tuning (and bottleneck adapters) on a task model train its new head too: it must be saved."""
    model = peftlite.inject(llama_classifier(), method="prefix", prefix_len=3)
    assert model.score.weight.requires_grad
    with torch.no_grad():
        model.score.weight.normal_()
        model.prefix_encoder["default"].prefix.normal_()
    ids = torch.randint(1, 64, (2, 7))
    expected = model(input_ids=ids).logits
    peftlite.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["score"]
    fresh = peftlite.load_adapter(llama_classifier(), tmp_path)
    torch.testing.assert_close(fresh(input_ids=ids).logits, expected, rtol=0, atol=0)
    assert fresh.score.weight.requires_grad
    peft = pytest.importorskip("peft")  # PEFT writes a task head beside a prefix as base_model.<module>.<key>
    theirs = peft.get_peft_model(tiny_bert(), peft.PrefixTuningConfig(num_virtual_tokens=3, task_type="SEQ_CLS"))
    with torch.no_grad():
        theirs.base_model.classifier.modules_to_save["default"].weight.normal_()
    theirs.save_pretrained(tmp_path / "peft")
    ours = peftlite.load_adapter(tiny_bert(), tmp_path / "peft")
    assert torch.equal(ours.classifier.weight, theirs.base_model.classifier.modules_to_save["default"].weight)
    adapter = peftlite.inject(tiny_bert(), method="adapter", targets=["attention.output.dense"])
    with torch.no_grad():
        adapter.classifier.weight.normal_()
    peftlite.save_adapter(adapter, tmp_path / "bottleneck")
    assert json.loads((tmp_path / "bottleneck" / "adapter_config.json").read_text())["modules_to_save"] == [
        "classifier"]
    reloaded = peftlite.load_adapter(tiny_bert(), tmp_path / "bottleneck")
    assert torch.equal(reloaded.classifier.weight, adapter.classifier.weight)


def test_an_attribute_set_on_a_layer_cannot_make_saving_and_computing_disagree(tmp_path):
    """`layer.alpha = 32` once changed what save_adapter wrote but not what the layer computed."""
    torch.manual_seed(0)
    model = peftlite.inject(nn.Sequential(nn.Linear(6, 6)), rank=2, alpha=4, targets=["0"])
    nonzero_b(model)
    model[0].alpha = 32  # a stray attribute now: the settings live in lora_settings, read by forward and save
    x = torch.randn(3, 6)
    peftlite.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["lora_alpha"] == 4
    torch.manual_seed(0)
    fresh = peftlite.load_adapter(nn.Sequential(nn.Linear(6, 6)), tmp_path)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_a_file_giving_one_shared_module_two_adapters_is_refused(tmp_path):
    shared = nn.Linear(4, 4)
    model = nn.ModuleDict({"a": shared, "b": shared})
    key = "base_model.model.{}.lora_{}.weight"
    values = {key.format(path, part): torch.randn(2, 4) if part == "A" else torch.randn(4, 2)
              for path in "ab" for part in "AB"}
    save_file(values, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    assert_load_refused(model, tmp_path, "layers '[ab]' and '[ab]' are one module .shared., but the file gives "
                                         "them different LoRA values")
    same = {k: v for k, v in values.items() if ".a." in k}
    same.update({k.replace(".a.", ".b."): v.clone() for k, v in same.items()})
    save_file(same, tmp_path / "adapter_model.safetensors")
    peftlite.load_adapter(model, tmp_path)  # the same adapter under both paths: fine, one adapter
    assert torch.equal(model["a"].lora_A["default"], same["base_model.model.a.lora_A.weight"])
