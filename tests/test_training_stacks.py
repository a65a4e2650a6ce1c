"""peftlite inside the training stacks users run: the Hugging Face Trainer (adapter-only checkpoints, exact
resume), save_pretrained, DDP (gloo, 2 processes) and activation checkpointing."""

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
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


def train(output, steps, trainer_class, resume=None):
    model = peftlite.inject(tiny_llama(), rank=4, dropout=0.1)
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


# ---- DDP ----

def ddp_worker(rank, world, init, steps, batches, result):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    model = peftlite.inject(TinyMLP(), rank=3)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=0.1)
    for x in batches:
        half = x.chunk(world)[rank]
        ddp(half).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    if rank == 0:
        peftlite.save_adapter(ddp, result)
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
    dist.destroy_process_group()


def test_ddp_on_a_split_batch_equals_one_process_on_the_whole_batch(tmp_path):
    batches = [torch.randn(8, 12, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(ddp_worker, args=(2, init, 3, batches, str(tmp_path / "ddp")), nprocs=2, join=True)
    torch.manual_seed(0)
    single = peftlite.inject(TinyMLP(), rank=3)
    optimizer = torch.optim.SGD([p for p in single.parameters() if p.requires_grad], lr=0.1)
    for x in batches:
        single(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    torch.manual_seed(0)
    loaded = peftlite.load_adapter(TinyMLP(), tmp_path / "ddp")
    for name, value in adapters(single).items():
        torch.testing.assert_close(dict(loaded.named_parameters())[name], value, rtol=1e-6, atol=1e-7)


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


def test_reentrant_checkpointing_after_a_frozen_embedding_trains_lora_without_a_helper():
    torch.manual_seed(0)
    model = peftlite.inject(Blocks("reentrant"), rank=2, targets=["blocks.0.0", "blocks.1.2"]).train()
    model(torch.randint(0, 20, (2, 5))).sum().backward()
    peftlite.check_gradients(model)
    plain = peftlite.unload(model)
    assert not plain.embed._forward_hooks  # unload takes the hook away again
