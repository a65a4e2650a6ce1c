"""peftlite merge / extract end to end on checkpoints written by transformers, against PEFT's merge_and_unload."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import peftlite
from peftlite import PeftliteError
from peftlite.export import extract_adapter, merge_checkpoint

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))


def llama_config(**overrides):
    config = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=False)
    config.update(overrides)
    return transformers.LlamaConfig(**config)


def gpt2_config(**overrides):
    return transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32, **overrides)


def save_base(directory, family="llama", dtype=torch.float32, shard=None, **overrides):
    torch.manual_seed(0)
    config = llama_config(**overrides) if family == "llama" else gpt2_config(**overrides)
    cls = transformers.LlamaForCausalLM if family == "llama" else transformers.GPT2LMHeadModel
    model = cls(config).to(dtype).eval()
    model.save_pretrained(directory, **({"max_shard_size": shard} if shard else {}))
    return cls


def randomize(model, seed=3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_A" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)


def tensors(directory):
    found = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        found.update(load_file(path))
    return found


def digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(directory).iterdir())}


def peft_merged(cls, base, adapter, out):
    """PEFT's merge_and_unload + save_pretrained(safe_serialization=True): the reference."""
    model = peft.PeftModel.from_pretrained(cls.from_pretrained(base), adapter)
    model.merge_and_unload().save_pretrained(out, safe_serialization=True)
    return tensors(out)


def assert_matches(ours, theirs, dtype):
    assert set(ours) == set(theirs)
    for key, value in ours.items():
        assert value.dtype == theirs[key].dtype and value.shape == theirs[key].shape, key
        if dtype == torch.float32:
            torch.testing.assert_close(value, theirs[key], rtol=0, atol=1e-6)
        else:  # one rounding: at most one unit in the last place apart
            gap = (value.double() - theirs[key].double()).abs()
            ulp = torch.finfo(dtype).eps * theirs[key].double().abs().clamp(min=torch.finfo(dtype).tiny)
            assert bool((gap <= ulp * 1.01).all()), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shard", [None, "20KB"])
def test_llama_merge_equals_peft_and_loads_with_from_pretrained(tmp_path, dtype, shard):
    cls = save_base(tmp_path / "base", dtype=dtype, shard=shard)
    model = peftlite.inject(cls.from_pretrained(tmp_path / "base").eval(), rank=4, alpha=8, rslora=True)
    randomize(model)
    peftlite.save_adapter(model, tmp_path / "adapter")
    before = digest(tmp_path / "base")
    result = merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    assert result["merged"] == 14 and digest(tmp_path / "base") == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(before)  # shards, index, configs
    ours = tensors(tmp_path / "out")
    assert_matches(ours, peft_merged(cls, tmp_path / "base", tmp_path / "adapter", tmp_path / "peft"), dtype)
    merged = cls.from_pretrained(tmp_path / "out").eval()
    reference = peft.PeftModel.from_pretrained(cls.from_pretrained(tmp_path / "base"), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits.float(), reference(IDS).logits.float(),
                                   rtol=0.05 if dtype != torch.float32 else 1e-5,
                                   atol=0.05 if dtype != torch.float32 else 1e-5)


def test_gpt2_conv1d_with_fan_in_fan_out_an_embedding_and_rank_pattern_written_by_peft(tmp_path):
    cls = save_base(tmp_path / "base", family="gpt2", tie_word_embeddings=False)  # the head stored on its own
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "wte"], fan_in_fan_out=True,
                             rank_pattern={"h.1.attn.c_attn": 2}, alpha_pattern={"h.0.mlp.c_proj": 3})
    theirs = peft.get_peft_model(cls.from_pretrained(tmp_path / "base"), config)
    randomize(theirs)
    theirs.save_pretrained(tmp_path / "adapter")
    merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    reference = peft_merged(cls, tmp_path / "base", tmp_path / "adapter", tmp_path / "peft")
    assert_matches(tensors(tmp_path / "out"), reference, torch.float32)


def test_two_named_adapters_merge_with_their_weights(tmp_path):
    cls = save_base(tmp_path / "base")
    model = cls.from_pretrained(tmp_path / "base").eval()
    peftlite.inject(model, rank=4, alpha=8, name="default")
    peftlite.inject(model, rank=2, alpha=2, name="other", targets=["q_proj", "v_proj"])
    randomize(model)
    peftlite.save_adapter(model, tmp_path / "adapter")
    expected = {key: value.double() for key, value in tensors(tmp_path / "base").items()}
    for name, weight in (("default", 0.7), ("other", -0.5)):  # W + sum w * (alpha / r) * B A, from the math
        for path, layer in peftlite.lora.lora_layers(model).items():
            if name in layer.lora_settings:
                a, b = layer.lora_A[name].detach().double(), layer.lora_B[name].detach().double()
                settings = layer.lora_settings[name]
                expected[f"{path}.weight"] += weight * settings.alpha / settings.rank * b @ a
    out = subprocess.run([sys.executable, "-m", "peftlite", "merge", str(tmp_path / "base"), str(tmp_path / "adapter"),
                          str(tmp_path / "out"), "--adapter", "default:0.7", "--adapter", "other:-0.5"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "merged 14 tensors" in out.stdout
    ours = tensors(tmp_path / "out")
    for key, value in expected.items():
        torch.testing.assert_close(ours[key].double(), value, rtol=1e-6, atol=1e-6)


def test_conv_and_embedding_layers_of_a_plain_module_merge_as_in_memory(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"conv": torch.nn.Conv2d(3, 5, (3, 2)), "embed": torch.nn.Embedding(11, 4),
                                 "proj": torch.nn.Linear(6, 7)})
    (tmp_path / "base").mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "base" / "model.safetensors")
    host = torch.nn.Module()
    host.model = model  # the adapter keys carry a prefix the checkpoint lacks
    peftlite.inject(host, rank=2, alpha=3, targets=["conv", "embed", "proj"])
    with torch.no_grad():
        for name, p in host.named_parameters():
            if "lora" in name:
                p.normal_(0, 0.3)
    peftlite.save_adapter(host, tmp_path / "adapter")
    merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    peftlite.merge(host)
    ours = tensors(tmp_path / "out")
    assert set(ours) == {key for key in model.state_dict() if ".lora_" not in key}
    for key in ours:
        torch.testing.assert_close(ours[key], model.state_dict()[key], rtol=0, atol=1e-6)


def test_a_checkpoint_without_the_model_prefix_is_matched_and_reported(tmp_path):
    cls = save_base(tmp_path / "full")
    inner = {k.removeprefix("model."): v for k, v in tensors(tmp_path / "full").items() if k.startswith("model.")}
    (tmp_path / "base").mkdir()
    save_file(inner, tmp_path / "base" / "model.safetensors", metadata={"format": "pt"})
    model = peftlite.inject(cls.from_pretrained(tmp_path / "full").eval(), rank=2, targets=["q_proj"])
    randomize(model)
    peftlite.save_adapter(model, tmp_path / "adapter")
    result = merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    assert any("removed 'model.'" in note for note in result["notes"])
    merged = tensors(tmp_path / "out")
    layer = model.model.layers[1].self_attn.q_proj
    torch.testing.assert_close(merged["layers.1.self_attn.q_proj.weight"],
                               inner["layers.1.self_attn.q_proj.weight"] + layer.delta_weight(), rtol=0, atol=1e-6)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "peftlite", *map(str, args)], capture_output=True, text=True)


def one_line_error(result, match):
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert match in result.stderr, result.stderr


@pytest.fixture
def llama_and_adapter(tmp_path):
    cls = save_base(tmp_path / "base")
    model = peftlite.inject(cls.from_pretrained(tmp_path / "base").eval(), rank=2)
    randomize(model)
    peftlite.save_adapter(model, tmp_path / "adapter")
    return tmp_path


def test_errors_are_one_line_leave_base_untouched_and_nothing_complete(llama_and_adapter):
    tmp = llama_and_adapter
    base, adapter = tmp / "base", tmp / "adapter"
    before = digest(base)
    (tmp / "busy").mkdir()
    (tmp / "busy" / "keep.txt").write_text("mine")
    one_line_error(run_cli("merge", base, adapter, tmp / "busy"), "is not empty; pass --force")
    assert [p.name for p in (tmp / "busy").iterdir()] == ["keep.txt"]
    one_line_error(run_cli("merge", base, adapter, base), "holds an input")
    one_line_error(run_cli("merge", tmp / "nope", adapter, tmp / "o1"), "no such file or directory")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (tmp / "dora").mkdir()
    (tmp / "dora" / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    (tmp / "dora" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    one_line_error(run_cli("merge", base, tmp / "dora", tmp / "o2"), "use_dora")
    other = dict(tensors(base))
    other["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(5, 5)
    (tmp / "wrong").mkdir()
    save_file(other, tmp / "wrong" / "model.safetensors")
    one_line_error(run_cli("merge", tmp / "wrong", adapter, tmp / "o3"), "its delta is [32, 32]")
    (tmp / "broken").mkdir()
    (tmp / "broken" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    one_line_error(run_cli("merge", tmp / "broken", adapter, tmp / "o4"), "not a readable safetensors file")
    huge = dict(tensors(adapter))
    for part, value in (("lora_A", 10.0), ("lora_B", 3e38)):  # a finite adapter whose delta overflows
        key = next(k for k in huge if part in k)
        huge[key] = torch.full_like(huge[key], value)
    (tmp / "huge").mkdir()
    (tmp / "huge" / "adapter_config.json").write_text(json.dumps(config))
    save_file(huge, tmp / "huge" / "adapter_model.safetensors")
    one_line_error(run_cli("merge", base, tmp / "huge", tmp / "o5"), "NaN or Inf")
    for name in ("o1", "o2", "o3", "o4", "o5"):  # nothing that looks complete
        assert not (tmp / name).exists() or not any(p for p in (tmp / name).iterdir() if not p.name.startswith("."))
    assert digest(base) == before


def test_a_run_killed_half_way_leaves_nothing_that_looks_complete(tmp_path):
    cls = save_base(tmp_path / "base", shard="20KB")
    model = peftlite.inject(cls.from_pretrained(tmp_path / "base").eval(), rank=2)
    peftlite.save_adapter(model, tmp_path / "adapter")
    slow = ("import time, sys, peftlite.io.safetensors_file as s; copy = s.StreamWriter.copy\n"
            "def slow(self, *a, **k):\n    time.sleep(0.2); return copy(self, *a, **k)\n"
            "s.StreamWriter.copy = slow\nfrom peftlite.cli import main\nsys.exit(main(sys.argv[1:]))")
    process = subprocess.Popen([sys.executable, "-c", slow, "merge", str(tmp_path / "base"), str(tmp_path / "adapter"),
                                str(tmp_path / "out")])
    deadline = time.time() + 60
    while not list((tmp_path / "out").glob(".peftlite-partial-*/*.safetensors")) and time.time() < deadline:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert [p for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")] == []
    result = merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", force=True)
    assert result["merged"] == 14 and not list((tmp_path / "out").glob(".peftlite-partial-*"))


def test_tied_embeddings_stored_once_are_refused_naming_both(tmp_path):
    cls = save_base(tmp_path / "base", family="gpt2")  # GPT-2 ties lm_head to wte, stored once
    config = peft.LoraConfig(r=2, target_modules=["wte"])
    theirs = peft.get_peft_model(cls.from_pretrained(tmp_path / "base"), config)
    randomize(theirs)
    theirs.save_pretrained(tmp_path / "adapter")
    with pytest.raises(PeftliteError, match="'transformer.wte.weight', which BASE also uses as its output head"):
        merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    assert not (tmp_path / "out").exists() or not [p for p in (tmp_path / "out").iterdir()
                                                    if not p.name.startswith(".")]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_peak_memory_stays_within_the_documented_bound(tmp_path):
    """A synthetic checkpoint of 64 tensors of 6 MiB (384 MiB), merged in a fresh process: its peak RSS
    rises by at most the largest tensor + 3 blocks + the copy buffer, not by the checkpoint's size."""
    generator = torch.Generator().manual_seed(0)
    (tmp_path / "base").mkdir()
    layers = {f"layers.{i}.proj.weight": torch.randn(1024, 1536, generator=generator) for i in range(64)}
    save_file(layers, tmp_path / "base" / "model.safetensors")
    adapter = {f"base_model.model.layers.{i}.proj.lora_A.weight": torch.randn(4, 1536, generator=generator) * 0.01
               for i in range(0, 64, 2)}
    adapter |= {f"base_model.model.layers.{i}.proj.lora_B.weight": torch.randn(1024, 4, generator=generator) * 0.01
                for i in range(0, 64, 2)}
    del layers
    (tmp_path / "adapter").mkdir()
    save_file(adapter, tmp_path / "adapter" / "adapter_model.safetensors")
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["proj"]}))
    probe = ("import sys, json, peftlite.export as e\n"
             "def rss(field):\n    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(field))\n"
             "open('/proc/self/clear_refs', 'w').write('5'); before = rss('VmRSS')\n"
             "r = e.merge_checkpoint(sys.argv[1], sys.argv[2], sys.argv[3])\n"
             "print(json.dumps({'rise': (rss('VmHWM') - before) * 1024, 'merged': r['merged']}))")
    done = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "base"), str(tmp_path / "adapter"),
                           str(tmp_path / "out")], capture_output=True, text=True, check=True)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    from peftlite.export.merge import BLOCK_BYTES

    bound = 6 * 2**20 + 3 * BLOCK_BYTES + 64 * 2**20 + 2**20 * 8  # tensor + blocks + copy buffer + adapter, slack
    assert report["merged"] == 32
    assert report["rise"] <= bound, (report["rise"] / 2**20, bound / 2**20)
    assert report["rise"] < 384 * 2**20 / 2  # far below the checkpoint


def test_extract_round_trips_at_full_rank_and_loads_in_peft_and_peftlite(tmp_path):
    cls = save_base(tmp_path / "base")
    tuned = cls.from_pretrained(tmp_path / "base")
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "proj" in name:
                p.add_(torch.randn(p.shape) * 0.01)
    tuned.save_pretrained(tmp_path / "tuned")
    result = extract_adapter(tmp_path / "base", tmp_path / "tuned", tmp_path / "lora", rank=64)
    assert len(result["layers"]) == 14 and max(e for _, e in result["layers"].values()) < 1e-5
    merge_checkpoint(tmp_path / "base", tmp_path / "lora", tmp_path / "back")
    back, want = tensors(tmp_path / "back"), tensors(tmp_path / "tuned")
    for key, value in want.items():
        torch.testing.assert_close(back[key], value, rtol=1e-5, atol=1e-5)
    ours = peftlite.load_adapter(cls.from_pretrained(tmp_path / "base").eval(), tmp_path / "lora")
    theirs = peft.PeftModel.from_pretrained(cls.from_pretrained(tmp_path / "base"), tmp_path / "lora").eval()
    with torch.no_grad():
        expected = cls.from_pretrained(tmp_path / "tuned").eval()(IDS).logits
        torch.testing.assert_close(ours(IDS).logits, expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(theirs(IDS).logits, expected, rtol=1e-4, atol=1e-4)


def test_extract_energy_rule_against_a_float64_svd(tmp_path):
    generator = torch.Generator().manual_seed(0)
    base = {"a.proj.weight": torch.randn(24, 40, generator=generator), "b.proj.weight": torch.randn(16, 16,
                                                                                                  generator=generator)}
    tuned = {k: v + torch.randn(v.shape, generator=generator) @ torch.diag(torch.logspace(0, -3, v.shape[1]))
             for k, v in base.items()}
    for name, values in (("base", base), ("tuned", tuned)):
        (tmp_path / name).mkdir()
        save_file(values, tmp_path / name / "model.safetensors")
    result = extract_adapter(tmp_path / "base", tmp_path / "tuned", tmp_path / "lora", rank=12, energy=0.9)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    for key in base:
        delta = (tuned[key].double() - base[key].double())
        s = torch.linalg.svdvals(delta)
        share = s.square().cumsum(0) / s.square().sum()
        want = min(12, int((share < 0.9).sum()) + 1)
        module = key.removesuffix(".weight")
        rank, error = result["layers"][module]
        assert rank == want
        assert abs(error - float(s[want:].square().sum().sqrt() / s.square().sum().sqrt())) < 1e-5
    assert config["rank_pattern"] or len({r for r, _ in result["layers"].values()}) == 1


def test_the_console_script_is_installed_beside_the_interpreter():
    script = Path(sys.executable).parent / "peftlite"
    if not script.exists():
        pytest.skip("peftlite is not installed into this environment (pip install -e .)")
    done = subprocess.run([str(script), "merge", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "BASE" in done.stdout.upper()
    done = subprocess.run([str(script)], capture_output=True, text=True)
    assert done.returncode == 2 and "merge" in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_asking_for_cuda_without_one_is_a_one_line_error(llama_and_adapter):
    tmp = llama_and_adapter
    one_line_error(run_cli("merge", tmp / "base", tmp / "adapter", tmp / "o", "--device", "cuda"),
                   "no CUDA device is available here")
