"""PEFT interop for every layer kind, both ways, on real modules: GPT-2 (transformers' Conv1D, fan_in_fan_out),
a Llama with LoRA on its token embedding (lora_embedding_A/B), and a small conv net (Conv2d)."""

import json

import pytest
import torch
from torch import nn

import peftlite
from tests.models import tiny_llama

peft = pytest.importorskip("peft")


def gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=32, bos_token_id=0,
                        eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


class ConvNet(nn.Module):
    """Two convolutions and a linear head over 3x12x12 images."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, (3, 2), stride=2, padding=1)
        self.head = nn.Linear(6 * 7 * 6, 4)

    def forward(self, x):
        return self.head(torch.relu(self.conv2(torch.relu(self.conv1(x)))).flatten(1))


IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
IMAGES = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))
MODELS = {  # build, input, PEFT targets
    "gpt2": (gpt2, IDS, ["c_attn", "c_proj"]),
    "llama embedding": (tiny_llama, IDS, ["embed_tokens", "q_proj"]),
    "conv net": (ConvNet, IMAGES, ["conv1", "conv2"]),
}


def outputs(model, x):
    with torch.no_grad():
        out = model(x)
    return getattr(out, "logits", out)


def randomize(model, seed=7):
    """Nonzero values for every LoRA tensor of either library (zero B, or zero A on embeddings, hides bugs)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)


@pytest.mark.parametrize("which", MODELS)
def test_peftlite_adapters_load_in_peft_with_equal_outputs(which, tmp_path):
    build, x, targets = MODELS[which]
    model = peftlite.inject(build(), rank=4, alpha=8, targets=targets, trainable=[])
    randomize(model)
    expected = outputs(model, x)
    assert not torch.allclose(expected, outputs(build(), x))  # the adapter changes the output
    peftlite.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is (which == "gpt2")
    theirs = peft.PeftModel.from_pretrained(build(), tmp_path).eval()
    torch.testing.assert_close(outputs(theirs, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which", MODELS)
def test_peft_adapters_load_in_peftlite_with_equal_outputs(which, tmp_path):
    build, x, targets = MODELS[which]
    theirs = peft.get_peft_model(build(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                          fan_in_fan_out=which == "gpt2"))
    randomize(theirs)
    expected = outputs(theirs.eval(), x)
    assert not torch.allclose(expected, outputs(build(), x))  # the adapter changes the output
    theirs.save_pretrained(tmp_path)
    ours = peftlite.load_adapter(build(), tmp_path)
    torch.testing.assert_close(outputs(ours.eval(), x), expected, rtol=1e-5, atol=1e-5)
    peftlite.merge(ours)
    torch.testing.assert_close(outputs(ours, x), expected, rtol=1e-5, atol=1e-5)


def test_gpt2_default_targets_are_its_conv1d_layers_but_not_the_head():
    model = peftlite.inject(gpt2(), rank=4)
    adapted = {name.split(".", 3)[-1] for name, m in model.named_modules() if isinstance(m, peftlite.LoRALayer)}
    assert adapted == {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}
    assert type(model.lm_head) is nn.Linear


def test_gpt2_named_conv1d_targets():
    model = peftlite.inject(gpt2(), rank=4, targets=["c_attn"])
    assert [n for n, m in model.named_modules() if isinstance(m, peftlite.LoRALayer)] == [
        "transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]


def test_a_peft_file_whose_fan_in_fan_out_contradicts_the_layers_is_refused(tmp_path):
    model = peftlite.inject(gpt2(), rank=4, targets=["c_attn"])
    peftlite.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "fan_in_fan_out": False}))
    with pytest.raises(peftlite.PeftliteError, match="fan_in_fan_out is false, but 'transformer.h.0.attn.c_attn' is "
                                                     "a transformers Conv1D"):
        peftlite.load_adapter(gpt2(), tmp_path)
