"""peftlite inside the training stacks users run: the Hugging Face Trainer (adapter-only checkpoints, exact
resume), save_pretrained, DDP (gloo, 2 processes) and activation checkpointing."""


import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import peftlite
from peftlite import PeftliteError
from tests.models import TinyMLP

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))


class Tokens(torch.utils.data.Dataset):
    def __init__(self):
        self.ids = torch.randint(0, 64, (32, 12), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(config)


def train(output, steps, trainer_class, resume=None, frozen_a=False):
    model = peftlite.inject(tiny_llama(), rank=4, dropout=0.1)
    for name, param in model.named_parameters():
        if frozen_a and "lora_A" in name:  # LoRA-FA: A stays as initialised
            param.requires_grad_(False)
    args = transformers.TrainingArguments(str(output), max_steps=steps, per_device_train_batch_size=4, save_steps=3,
                                          learning_rate=1e-2, use_cpu=True, report_to=[], seed=0, logging_steps=100)
    trainer = trainer_class(model=model, args=args, train_dataset=Tokens())
    trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    return model, trainer


def adapters(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora" in n}


def logits(model):
    with torch.no_grad():
        return model.eval()(IDS).logits


def test_the_trainer_checkpoints_hold_the_adapter_alone_and_resume_exactly(tmp_path):
    from peftlite.hf import Trainer

    whole, _ = train(tmp_path / "whole", 6, Trainer)
    checkpoint = tmp_path / "whole" / "checkpoint-3"
    files = sorted(p.name for p in checkpoint.iterdir())
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    assert (checkpoint / "adapter_model.safetensors").stat().st_size < 40_000  # the model alone is ~420 KB
    resumed, trainer = train(tmp_path / "resumed", 6, Trainer, resume=checkpoint)
    for name, value in adapters(whole).items():
        assert torch.equal(value, adapters(resumed)[name]), name  # same weights as the uninterrupted run
    trainer.save_model(tmp_path / "final")
    expected = logits(resumed)
    again = peftlite.load_adapter(tiny_llama().eval(), tmp_path / "final")
    torch.testing.assert_close(logits(again), expected, rtol=0, atol=0)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "final")
    torch.testing.assert_close(logits(theirs), expected, rtol=1e-5, atol=1e-5)


def test_resuming_restores_values_and_keeps_the_flags_the_user_set(tmp_path):
    from peftlite.hf import Trainer

    whole, _ = train(tmp_path / "whole", 6, Trainer, frozen_a=True)
    resumed, _ = train(tmp_path / "resumed", 6, Trainer, resume=tmp_path / "whole" / "checkpoint-3", frozen_a=True)
    assert all(not p.requires_grad for n, p in resumed.named_parameters() if "lora_A" in n)
    assert all(p.requires_grad for n, p in resumed.named_parameters() if "lora_B" in n)
    initial = adapters(peftlite.inject(tiny_llama(), rank=4))
    for name, value in adapters(resumed).items():
        torch.testing.assert_close(value, adapters(whole)[name], rtol=0, atol=0)
        if "lora_A" in name:
            torch.testing.assert_close(value, initial[name], rtol=0, atol=0)  # never trained


def test_a_hot_swap_keeps_requires_grad_flags(tmp_path):
    model = peftlite.inject(TinyMLP(), rank=2)
    model.fc1.lora_A["default"].requires_grad_(False)
    peftlite.save_adapter(model, tmp_path)
    peftlite.load_adapter(model, tmp_path)
    assert not model.fc1.lora_A["default"].requires_grad and model.fc1.lora_B["default"].requires_grad
    assert model.fc2.lora_A["default"].requires_grad


def test_the_plain_trainer_writes_adapter_checkpoints_and_refuses_to_resume_silently(tmp_path):
    _, _ = train(tmp_path / "plain", 3, transformers.Trainer)
    checkpoint = tmp_path / "plain" / "checkpoint-3"
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()
    with pytest.raises(ValueError):  # transformers' own error: it reads full weights only
        train(tmp_path / "again", 6, transformers.Trainer, resume=checkpoint)


def test_save_pretrained_of_an_injected_model_never_drops_the_adapter_silently(tmp_path):
    model = peftlite.inject(tiny_llama(), rank=2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    expected = logits(model)
    model.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["adapter_config.json",
                                                                     "adapter_model.safetensors"]
    with pytest.raises(Exception):  # no weights there: loading the base alone is not possible
        transformers.LlamaForCausalLM.from_pretrained(tmp_path / "saved")
    torch.testing.assert_close(logits(peftlite.load_adapter(tiny_llama(), tmp_path / "saved")), expected)
    plain = peftlite.unload(model)
    assert "save_pretrained" not in plain.__dict__
    plain.save_pretrained(tmp_path / "merged")  # the class's own: the full, merged model
    torch.testing.assert_close(logits(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged")), expected,
                               rtol=1e-5, atol=1e-5)


def test_save_pretrained_writes_the_state_dict_it_is_given_and_never_an_empty_tensor(tmp_path):
    model = peftlite.inject(tiny_llama(), rank=2)
    given = {k: v + 1.0 if "lora" in k else v for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "given", state_dict=given)  # as transformers' save_pretrained does
    loaded = dict(peftlite.load_adapter(tiny_llama(), tmp_path / "given").named_parameters())
    assert all(torch.equal(loaded[k], v) for k, v in given.items() if "lora" in k)
    full = {k: v.clone() for k, v in model.state_dict().items()}
    layer = model.model.layers[0].self_attn.q_proj
    layer.lora_A["default"].data = torch.empty(0)  # what DeepSpeed ZeRO-3 leaves a rank of a partitioned parameter
    with pytest.raises(PeftliteError, match=r"empty .*q_proj\.lora_A.*partitioned.*nothing was written"):
        peftlite.save_adapter(model, tmp_path / "partitioned")
    assert not (tmp_path / "partitioned").exists()
    model.save_pretrained(tmp_path / "gathered", state_dict=full)  # the Trainer's gathered state dict: whole again
    loaded = dict(peftlite.load_adapter(tiny_llama(), tmp_path / "gathered").named_parameters())
    assert all(torch.equal(loaded[k], v) for k, v in full.items() if "lora" in k)
    with pytest.raises(PeftliteError, match="expected the whole tensor"):
        model.save_pretrained(tmp_path / "bad", state_dict={**full, "model.layers.1.mlp.up_proj.lora_B.default":
                                                            torch.zeros(3)})
    assert not (tmp_path / "bad").exists()


# ---- DDP and FSDP2: two gloo processes under torch.distributed.run (tests/dist_train.py) ----

def launch(*args) -> subprocess.CompletedProcess:
    """``torch.distributed.run`` with 2 processes. On this kind of VM a gloo rendezvous now and then stalls
    before training starts; a launch that times out is retried once (a deadlock in the code under test
    would time out both times)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *map(str, args)]
    for attempt in range(2):
        try:
            return subprocess.run(command, capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            if attempt:
                raise


def run_distributed(mode: str, dtype: torch.dtype, out) -> None:
    done = launch(Path(__file__).resolve().parent / "dist_train.py", mode, str(dtype).removeprefix("torch."), out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "returned a view tensor" not in done.stderr  # FSDP2's warning: outputs are not views, as nn.Linear's


@pytest.mark.parametrize("mode, dtype", [("ddp", torch.float32), ("fsdp", torch.float32), ("fsdp", torch.bfloat16)])
def test_two_processes_train_like_one_on_the_whole_batch_and_save_whole_adapters(tmp_path, mode, dtype):
    from tests.dist_train import single_process

    run_distributed(mode, dtype, tmp_path / "adapter")
    single = single_process(dtype)
    torch.manual_seed(0)
    loaded = peftlite.load_adapter(TinyMLP().to(dtype), tmp_path / "adapter")
    tolerance = {"rtol": 1e-6, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-3}
    for name, value in adapters(single).items():
        got = dict(loaded.named_parameters())[name]
        assert got.shape == value.shape and got.dtype == torch.float32  # whole fp32 tensors, never a shard
        torch.testing.assert_close(got, value, **tolerance)
    if mode == "fsdp":  # save_pretrained as the Trainer calls it (rank 0 alone, a gathered state dict) and per rank
        saved = safetensors.torch.load_file(tmp_path / "adapter" / "adapter_model.safetensors")
        for way in ("given", "every"):
            again = safetensors.torch.load_file(tmp_path / f"adapter-{way}" / "adapter_model.safetensors")
            assert again.keys() == saved.keys() and all(torch.equal(again[k], saved[k]) for k in saved), way


@pytest.mark.parametrize("shape", [(5, 12), (2, 3, 12)])
def test_lora_outputs_are_not_views_as_linear_outputs_are_not(shape):
    layer = peftlite.LoRALinear(nn.Linear(12, 7), rank=2, dropout=0.1)
    x = torch.randn(shape, requires_grad=True)
    for y in (layer(x), layer.eval()(x.detach())):
        assert y._base is None and nn.functional.linear(x, layer.weight)._base is None
    y = layer.train()(x)
    y.add_(1.0).sum().backward()  # an in-place op on the output: fine, as on a Linear's
    assert layer.lora_B["default"].grad is not None


# ---- activation checkpointing ----

class Blocks(nn.Module):
    """A frozen embedding, then two checkpointed blocks of Linear layers."""

    def __init__(self, mode=None):
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16)) for _ in range(2))
        self.mode = mode

    def forward(self, ids):
        h = self.embed(ids)
        for block in self.blocks:
            h = h + (block(h) if self.mode is None else checkpoint(block, h, use_reentrant=self.mode == "reentrant"))
        return h


@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant"])
def test_checkpointed_blocks_with_dropout_give_the_gradients_of_plain_ones(mode):
    ids = torch.randint(0, 20, (3, 7), generator=torch.Generator().manual_seed(1))
    grads = {}
    for which in (None, mode):
        torch.manual_seed(0)
        model = peftlite.inject(Blocks(which), rank=2, dropout=0.3, targets=["blocks.0.0", "blocks.1.2"]).train()
        if which == "reentrant":
            peftlite.enable_input_require_grads(model)  # the blocks' input comes from a frozen embedding
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_()
        torch.manual_seed(5)
        model(ids).square().sum().backward()
        grads[which] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads[None].keys() == grads[mode].keys() and all(g is not None for g in grads[mode].values())
    for name, value in grads[None].items():
        torch.testing.assert_close(grads[mode][name], value)


def test_check_gradients_names_adapters_that_got_no_gradient():
    torch.manual_seed(0)
    model = peftlite.inject(TinyMLP(), rank=2, targets=["fc1", "fc2"])
    with pytest.raises(PeftliteError, match="no backward has run"):
        peftlite.check_gradients(model)
    x = torch.randn(4, 12)
    (model.fc1(x).sum()).backward()  # fc2 is skipped
    with pytest.raises(PeftliteError, match="'fc2' .* got no gradient"):
        peftlite.check_gradients(model)
    model.zero_grad()
    model(x).sum().backward()
    peftlite.check_gradients(model)


def test_a_transformers_model_with_gradient_checkpointing_trains_its_adapters():
    model = peftlite.inject(tiny_llama(), rank=2).train()
    model.gradient_checkpointing_enable()  # reentrant by default: transformers makes the input require grad
    model(IDS, labels=IDS).loss.backward()
    peftlite.check_gradients(model)


def test_inject_adds_no_hook_and_reentrant_checkpointing_after_a_frozen_embedding_needs_the_helper():
    torch.manual_seed(0)
    model = peftlite.inject(Blocks("reentrant"), rank=2, targets=["blocks.0.0", "blocks.1.2"]).train()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    assert not model.embed._forward_hooks and not model.embed._forward_pre_hooks  # inject touches only its targets
    ids = torch.randint(0, 20, (2, 5))
    with warnings.catch_warnings():  # torch warns that no input requires grad
        warnings.simplefilter("ignore")
        assert not model(ids).requires_grad  # the checkpointed blocks were not recorded: no adapter can train
    with pytest.raises(PeftliteError, match="enable_input_require_grads"):
        peftlite.check_gradients(model)
    handle = peftlite.enable_input_require_grads(model)
    model(ids).sum().backward()
    peftlite.check_gradients(model)
    reentrant = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    model.mode = None  # the same model without checkpointing: the same gradients
    model(ids).sum().backward()
    for name, grad in reentrant.items():
        torch.testing.assert_close(grad, dict(model.named_parameters())[name].grad)
    handle.remove()
    assert not model.embed._forward_hooks


def test_enable_input_require_grads_without_a_frozen_embedding_says_so():
    with pytest.raises(PeftliteError, match="no frozen nn.Embedding"):
        peftlite.enable_input_require_grads(peftlite.inject(TinyMLP(), rank=2))


# ---- mixed precision ----

def autocast_error(model, x, names, dtype=torch.bfloat16):
    """Norm-wise relative error of the gradients of ``names`` under ``dtype`` autocast (on x's device) against
    float32, and the float32 activations ([tokens, ...]) autograd saved under autocast."""
    model.zero_grad()
    model(x).square().mean().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if n in names}
    model.zero_grad()
    saved = []

    def pack(t):
        if t.dtype == torch.float32 and t.ndim and t.shape[0] == x.shape[0]:
            saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast(x.device.type, dtype=dtype):
        out = model(x)
    out.float().square().mean().backward()
    params = dict(model.named_parameters())
    return {n: float((params[n].grad - g).norm() / g.norm()) for n, g in expected.items()}, out, saved


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("device, dtype", [("cpu", torch.bfloat16), pytest.param("cuda", torch.float16, marks=CUDA),
                                           pytest.param("cuda", torch.bfloat16, marks=CUDA)])
def test_autocast_matches_fp32_with_fp32_master_adapters_and_saves_no_fp32_activations(device, dtype):
    torch.manual_seed(0)
    model = peftlite.inject(TinyMLP(dims=(64, 96, 80)), rank=4).to(device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    x = torch.randn(33, 64).to(device)
    reference = model(x).detach()
    lora = [n for n, p in model.named_parameters() if p.requires_grad]
    errors, out, saved = autocast_error(model, x, lora, dtype)
    torch.testing.assert_close(out.float(), reference, rtol=3e-2, atol=3e-2)
    assert all(dict(model.named_parameters())[n].grad.dtype == torch.float32 for n in lora)  # fp32 master adapters
    # what autocast itself costs and keeps: the same network, merged and trained whole, in plain PyTorch
    plain = peftlite.unload(model).requires_grad_(True)
    plain_errors, _, plain_saved = autocast_error(plain, x, ["fc1.weight", "fc2.weight"], dtype)
    for name, error in errors.items():
        layer = name.split(".")[0]
        assert error <= 1.5 * plain_errors[f"{layer}.weight"], (name, error, plain_errors)
    assert sorted(saved) == sorted(plain_saved)  # LoRA saves no float32 activation of its own (LayerNorm's only)


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_the_trainer_example_runs(tmp_path):
    done = subprocess.run([sys.executable, str(EXAMPLES / "hf_trainer.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "the same adapter as the uninterrupted run: True" in done.stdout


@pytest.mark.parametrize("flag", [[], ["--fsdp"]])
def test_the_distributed_example_runs(tmp_path, flag):
    done = launch(EXAMPLES / "distributed.py", *flag, "--out", tmp_path / "adapter")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "adapter saved" in done.stdout and (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
