"""merge_checkpoint / extract_adapter as strict as load_adapter: every hostile input raises a PeftliteError naming the
argument or the file and field, and leaves BASE, ADAPTER and TUNED byte for byte and OUT without anything complete.
Plus the silent wrong results these entry points had (a target's own weight beside its delta, changed tensors an
extract left out, the GPT-2 layout)."""

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import peftlite
from peftlite import PeftliteError
from peftlite.export import extract_adapter, merge_checkpoint
from tests.test_export import randomize

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def tiny(family="llama"):
    torch.manual_seed(0)
    if family == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4,
                                                                     n_positions=32)).eval()
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False)).eval()


def randomized(model):
    randomize(model)  # nonzero B (and embedding A): zero hides bugs
    return model


def files(tmp: Path) -> dict:
    return {str(p.relative_to(tmp)): p.read_bytes() for p in sorted(tmp.rglob("*"))
            if not p.is_symlink() and p.is_file()}


@pytest.fixture
def made(tmp_path):
    """BASE (a tiny Llama), ADAPTER (LoRA r2 on q_proj, v_proj, nonzero B) and TUNED (BASE with q_proj moved)."""
    tiny().save_pretrained(tmp_path / "base")
    model = randomized(peftlite.inject(tiny(), rank=2, targets=["q_proj", "v_proj"]))
    peftlite.save_adapter(model, tmp_path / "adapter")
    tuned = tiny()
    with torch.no_grad():
        tuned.model.layers[0].self_attn.q_proj.weight.add_(0.01)
    tuned.save_pretrained(tmp_path / "tuned")
    return tmp_path


def edit_adapter(tmp, tensors=None, config=None):
    """ADAPTER with its tensors and config changed by the given functions, in place."""
    folder = tmp / "adapter"
    if tensors is not None:
        values = load_file(folder / WEIGHTS)
        tensors(values)
        save_file(values, folder / WEIGHTS, metadata={"format": "pt"})
    if config is not None:
        data = json.loads((folder / CONFIG).read_text())
        config(data)
        (folder / CONFIG).write_text(json.dumps(data))
    return folder


Q = "base_model.model.model.layers.0.self_attn.q_proj"


def raw_base(tmp, entry, metadata=None):
    """BASE as a hand-written safetensors file whose header holds ``entry`` beside one valid tensor."""
    header = {"ok": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "bad": entry}
    if metadata is not None:
        header["__metadata__"] = metadata
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    folder = tmp / "rawbase"
    folder.mkdir(exist_ok=True)
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(encoded)) + encoded + bytes(8))
    return folder


def raw(entry, metadata=None):
    """(prepare, call) of a merge whose BASE is a hand-written header holding ``entry``."""
    return (lambda t: raw_base(t, entry, metadata),
            lambda t: merge_checkpoint(t / "rawbase", t / "adapter", t / "out"))


def merge(tmp, **options):
    return merge_checkpoint(tmp / "base", tmp / "adapter", tmp / "out", **options)


def extract(tmp, **options):
    return extract_adapter(tmp / "base", tmp / "tuned", tmp / "out", **{"rank": 4, **options})


def extra_key(tmp):
    edit_adapter(tmp, tensors=lambda t: t.update({"base_model.model.model.norm.weight": torch.ones(32)}))


def saved_whole_and_adapted(tmp):
    edit_adapter(tmp, tensors=lambda t: t.update({f"{Q}.weight": torch.zeros(32, 32)}),
                 config=lambda c: c.update(modules_to_save=["q_proj"]))


def symlink_loop(tmp):
    (tmp / "loop").symlink_to(tmp / "loop")
    return tmp / "loop"


def tuned_with(tmp, value):
    values = load_file(tmp / "tuned" / "model.safetensors")
    values["model.layers.0.self_attn.q_proj.weight"][0, :2] = value
    save_file(values, tmp / "tuned" / "model.safetensors", metadata={"format": "pt"})


def opposite_extremes(tmp):
    """Finite weights whose float32 difference is not: 3e38 in TUNED where BASE holds -3e38."""
    tuned_with(tmp, 3e38)
    values = load_file(tmp / "base" / "model.safetensors")
    values["model.layers.0.self_attn.q_proj.weight"][0, :2] = -3e38
    save_file(values, tmp / "base" / "model.safetensors", metadata={"format": "pt"})


def gpt2_pair(tmp):
    tiny("gpt2").save_pretrained(tmp / "gbase")
    tuned = tiny("gpt2")
    with torch.no_grad():
        tuned.transformer.h[0].attn.c_attn.weight.add_(0.01)
    tuned.save_pretrained(tmp / "gtuned")


CASES = {  # name: (prepare(tmp) or None, call(tmp), expected message)
    # merge_checkpoint's arguments
    "merge adapters empty": (None, lambda t: merge(t, adapters={}), "adapters={}: expected a non-empty dict"),
    "merge adapters list": (None, lambda t: merge(t, adapters=["default"]), "adapters=\\['default'\\]"),
    "merge adapters name number": (None, lambda t: merge(t, adapters={3: 1.0}), "has no adapter 3"),
    "merge weight huge int": (None, lambda t: merge(t, adapters={"default": 10**400}), "expected a finite number"),
    "merge force string": (None, lambda t: merge(t, force="no"), "force='no': expected True or False"),
    "merge device meta": (None, lambda t: merge(t, device="meta"), "device='meta'"),
    "merge progress not callable": (None, lambda t: merge(t, progress=5), "progress=5"),
    "merge OUT symlink loop": (symlink_loop, lambda t: merge_checkpoint(t / "base", t / "adapter", t / "loop"),
                               "cannot be resolved"),
    # ADAPTER files merge_checkpoint reads as load_adapter does
    "merge whole key not listed": (extra_key, merge, "unexpected key 'base_model.model.model.norm.weight'"),
    "merge saved whole and adapted": (saved_whole_and_adapted, merge,
                                      "saves module 'model.layers.0.self_attn.q_proj' whole .* also holds LoRA"),
    "merge int64 lora_A": (lambda t: edit_adapter(t, tensors=lambda v: v.update(
        {f"{Q}.lora_A.weight": torch.zeros(2, 32, dtype=torch.int64)})), merge, "dtype torch.int64/torch.float32"),
    "merge 1-D lora": (lambda t: edit_adapter(t, tensors=lambda v: v.update(
        {f"{Q}.lora_A.weight": torch.zeros(64), f"{Q}.lora_B.weight": torch.zeros(64)})), merge,
        "expected 2-D pairs"),
    "merge 6-D lora": (lambda t: edit_adapter(t, tensors=lambda v: v.update(
        {f"{Q}.lora_A.weight": torch.zeros(2, 32, 1, 1, 1, 1), f"{Q}.lora_B.weight": torch.zeros(32, 2, 1, 1, 1, 1)})),
        merge, "expected 2-D pairs"),
    # BASE headers safetensors itself refuses
    "base negative shape": (*raw({"dtype": "F32", "shape": [-1, -3], "data_offsets": [8, 8]}),
                            "shape \\[-1, -3\\] is not a list of non-negative integers"),
    "base bool in shape": (*raw({"dtype": "F32", "shape": [True, 3], "data_offsets": [8, 20]}),
                           "shape \\[True, 3\\]"),
    "base overflowing zero-size shape": (*raw({"dtype": "F32", "shape": [2**62, 2**62, 0], "data_offsets": [8, 8]}),
                                         "overflows 64 bits"),
    "base metadata not strings": (*raw({"dtype": "F32", "shape": [0], "data_offsets": [8, 8]}, {"format": 1}),
                                  "__metadata__"),
    "base entry a float": (*raw(1.5), "tensor 'bad': entry 1.5"),
    "base entry a list": (*raw([1, 2]), "tensor 'bad': entry \\[1, 2\\]"),
    # extract_adapter
    "extract fan_in_fan_out string": (None, lambda t: extract(t, fan_in_fan_out="no"),
                                      "fan_in_fan_out='no': expected True or False"),
    "extract force string": (None, lambda t: extract(t, force="yes"), "force='yes'"),
    "extract targets number": (None, lambda t: extract(t, targets=5), "targets=5"),
    "extract targets empty": (None, lambda t: extract(t, targets=[]), "targets=\\[\\]"),
    "extract Inf in TUNED": (lambda t: tuned_with(t, math.inf), extract, "TUNED holds NaN or Inf"),
    "extract NaN in TUNED": (lambda t: tuned_with(t, math.nan), extract, "TUNED holds NaN or Inf"),
    "extract delta overflows": (opposite_extremes, extract, "TUNED - BASE overflows torch.float32"),
    "extract gpt2 told untransposed": (gpt2_pair, lambda t: extract_adapter(
        t / "gbase", t / "gtuned", t / "out", rank=4, fan_in_fan_out=False), "model_type 'gpt2'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_export_input_raises_and_changes_nothing(case, made):
    prepare, call, match = CASES[case]
    if prepare is not None:
        prepare(made)
    before = files(made)
    with pytest.raises(PeftliteError, match=match):
        call(made)
    after = files(made)
    written = {k for k in after if k.startswith("out/")} - {k for k in before if k.startswith("out/")}
    assert not written, written  # nothing complete, nothing partial left
    assert {k: v for k, v in after.items() if not k.startswith("out/")} == \
        {k: v for k, v in before.items() if not k.startswith("out/")}


# ---- the silent wrong results ----

def test_a_targets_own_weight_beside_its_delta_merges_as_load_adapter_applies_both(made):
    """PEFT's save_embedding_layers writes ``<target>.base_layer.weight``: both it and the delta apply."""
    new_rows = torch.randn(64, 32, generator=torch.Generator().manual_seed(5))
    model = randomized(peftlite.inject(tiny(), rank=2, targets=["embed_tokens", "q_proj"]))
    peftlite.save_adapter(model, made / "emb")
    values = load_file(made / "emb" / WEIGHTS)
    values["base_model.model.model.embed_tokens.base_layer.weight"] = new_rows
    save_file(values, made / "emb" / WEIGHTS, metadata={"format": "pt"})
    loaded = peftlite.load_adapter(tiny(), made / "emb")
    merge_checkpoint(made / "base", made / "emb", made / "out")
    merged = transformers.LlamaForCausalLM.from_pretrained(made / "out").eval()
    with torch.no_grad():
        expected = loaded(IDS).logits
        torch.testing.assert_close(merged(IDS).logits, expected, rtol=1e-5, atol=1e-5)
        assert (expected - tiny()(IDS).logits).abs().max() > 0.1  # the file's rows and delta do something


def test_a_full_rank_extract_carries_every_changed_tensor_and_reproduces_tuned(made):
    tuned = tiny()
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.02)
    tuned.save_pretrained(made / "tuned2")
    result = extract_adapter(made / "base", made / "tuned2", made / "lora", rank=64)
    assert "lm_head" in result["whole"] and "model.embed_tokens" in result["whole"] and "model.norm" in result["whole"]
    merge_checkpoint(made / "base", made / "lora", made / "back")
    back = transformers.LlamaForCausalLM.from_pretrained(made / "back").eval()
    ours = peftlite.load_adapter(tiny(), made / "lora")
    theirs = peft.PeftModel.from_pretrained(tiny(), made / "lora").eval()
    with torch.no_grad():
        expected = tuned(IDS).logits
        assert (expected - tiny()(IDS).logits).abs().max() > 0.1
        for model in (back, ours, theirs):
            torch.testing.assert_close(model(IDS).logits, expected, rtol=1e-4, atol=1e-4)


def test_a_gpt2_extract_follows_the_config_layout_and_loads_in_both_libraries(made):
    gpt2_pair(made)
    extract_adapter(made / "gbase", made / "gtuned", made / "glora", rank=64)
    assert json.loads((made / "glora" / CONFIG).read_text())["fan_in_fan_out"] is True
    tuned = transformers.GPT2LMHeadModel.from_pretrained(made / "gtuned").eval()
    ours = peftlite.load_adapter(tiny("gpt2"), made / "glora")
    theirs = peft.PeftModel.from_pretrained(tiny("gpt2"), made / "glora").eval()
    with torch.no_grad():
        for model in (ours, theirs):
            torch.testing.assert_close(model(IDS).logits, tuned(IDS).logits, rtol=1e-4, atol=1e-4)


def test_a_full_disk_is_one_line_and_leaves_nothing(made):
    """A real write failure: the merge runs with a 16 KiB file-size limit (writes past it fail with EFBIG)."""
    import resource
    import signal
    import subprocess
    import sys

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 10, 16 << 10))

    before = files(made)
    done = subprocess.run([sys.executable, "-m", "peftlite", "merge", made / "base", made / "adapter", made / "out"],
                          capture_output=True, text=True, preexec_fn=limited)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "peftlite merge: error:" in done.stderr
    after = files(made)
    assert not [k for k in after if k.startswith("out/")]
    assert after == before


def test_a_target_whose_bias_moved_is_carried_whole_and_the_rest_factorized(made):
    tiny("gpt2").save_pretrained(made / "gbase")
    tuned = tiny("gpt2")
    with torch.no_grad():
        tuned.transformer.h[0].attn.c_attn.weight.add_(0.01)
        tuned.transformer.h[0].attn.c_attn.bias.add_(0.05)
        tuned.transformer.h[1].mlp.c_fc.weight.add_(0.01)
    tuned.save_pretrained(made / "gtuned")
    result = extract_adapter(made / "gbase", made / "gtuned", made / "glora", rank=64)
    assert list(result["layers"]) == ["transformer.h.1.mlp.c_fc"] and result["whole"] == ["transformer.h.0.attn.c_attn"]
    merge_checkpoint(made / "gbase", made / "glora", made / "gback")
    back = transformers.GPT2LMHeadModel.from_pretrained(made / "gback").eval()
    ours = peftlite.load_adapter(tiny("gpt2"), made / "glora")
    theirs = peft.PeftModel.from_pretrained(tiny("gpt2"), made / "glora").eval()
    with torch.no_grad():
        expected = tuned.eval()(IDS).logits
        for model in (back, ours, theirs):
            torch.testing.assert_close(model(IDS).logits, expected, rtol=1e-4, atol=1e-4)
