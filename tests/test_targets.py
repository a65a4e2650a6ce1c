"""find_lora_targets: the default rule, the three spec forms, exclude, and errors that name the fix."""

import pytest
from torch import nn

from peftlite import PeftliteError
from peftlite.targets import find_lora_targets, output_heads
from tests.models import TinyMLP, tiny_bert, tiny_llama


def find_targets(model, targets=None, exclude=None):
    return list(find_lora_targets(model, targets, exclude))

LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_default_is_every_linear_but_the_head():
    assert find_targets(TinyMLP()) == ["fc1", "fc2"]
    llama = tiny_llama()
    names = find_targets(llama)
    assert "lm_head" not in names and len(names) == 2 * len(LLAMA_LINEARS)
    assert output_heads(llama) == {"lm_head"}


def test_bert_classifier_is_the_head():
    bert = tiny_bert()
    assert output_heads(bert) == {"classifier"}
    names = find_targets(bert)
    assert "classifier" not in names and "bert.pooler.dense" in names


def test_list_entries_match_exact_names_and_dotted_suffixes():
    names = find_targets(tiny_llama(), ["q_proj", "model.layers.1.mlp.down_proj"])
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
                     "model.layers.1.mlp.down_proj"]
    assert find_targets(TinyMLP(), ["head"]) == ["head"]  # an explicit head is allowed


def test_regex_must_fully_match():
    assert find_targets(tiny_llama(), r".*\.0\.self_attn\.[qv]_proj") == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    with pytest.raises(PeftliteError, match="matched no module"):
        find_targets(tiny_llama(), r"q_proj")  # a search would match; a full match does not


def test_callable_and_exclude():
    chosen = find_targets(tiny_llama(), lambda name, m: isinstance(m, nn.Linear) and "mlp" in name,
                          exclude=["down_proj"])
    assert chosen == [f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj")]
    assert find_targets(TinyMLP(), exclude=r"fc2") == ["fc1"]


def test_typo_lists_close_names():
    with pytest.raises(PeftliteError, match=r"'q_projj' matched no module\. Modules that look close: q_proj"):
        find_targets(tiny_llama(), ["q_projj"])
    with pytest.raises(PeftliteError, match="exclude entry 'up_prj'"):
        find_targets(tiny_llama(), exclude=["up_prj"])


def test_unsupported_target_names_its_type_and_the_kinds():
    with pytest.raises(PeftliteError, match="'model.layers.0.self_attn' is a LlamaAttention, which LoRA does not "
                                            "support; supported: nn.Linear .and subclasses., transformers Conv1D, "
                                            "nn.Embedding, nn.Conv1d/2d/3d"):
        find_targets(tiny_llama(), ["self_attn"])


def test_embeddings_and_convs_only_when_named():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Conv1d(8, 8, 3), nn.Linear(8, 8), nn.Linear(8, 3))
    assert find_targets(model) == ["2", "3"]  # no output head found by name here: both Linears
    assert find_targets(model, ["0", "1"]) == ["0", "1"]


def test_peftlite_modules_are_never_targets():
    import peftlite

    model = TinyMLP()
    peftlite.inject(model, method="adapter", targets=["fc1"])
    peftlite.inject(model, method="lora", rank=2)  # the bottleneck's down/up are not adapted
    adapted = [n for n, m in model.named_modules() if isinstance(m, peftlite.LoRALayer)]
    assert adapted == ["fc2"]
    with pytest.raises(PeftliteError, match="belongs to a peftlite module"):
        find_targets(model, ["fc1.adapter.default.down"])


def test_multihead_attention_internals_are_skipped_or_refused():
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16)
    assert find_targets(layer) == ["linear1", "linear2"]
    with pytest.raises(PeftliteError, match="MultiheadAttention"):
        find_targets(layer, ["out_proj"])


@pytest.mark.parametrize("spec", [[], "(", 3, ["q_proj", 4]])
def test_malformed_specs(spec):
    with pytest.raises(PeftliteError, match="targets="):
        find_targets(tiny_llama(), spec)


def test_excluding_everything_is_an_error():
    with pytest.raises(PeftliteError, match="left no layer to adapt"):
        find_targets(TinyMLP(), exclude=["fc1", "fc2"])
