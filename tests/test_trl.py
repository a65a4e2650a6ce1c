"""TRL's SFTTrainer and DPOTrainer with injected models (peftlite.trl): adapter-only checkpoints, exact
resumes, and a DPO reference that is the base model itself (the adapters switched off)."""

import copy
from pathlib import Path

import pytest
import torch

import peftlite
from peftlite import PeftliteError
from tests import models
from tests.models import assert_unchanged, randomize_lora, snapshot

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

WORDS = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(61)]


def tokenizer():
    """A word-level tokenizer over WORDS (ids = positions), built in memory."""
    import tokenizers
    from tokenizers import models, pre_tokenizers

    tok = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>")


def tiny_llama():
    return models.tiny_llama(pad_token_id=0, eos_token_id=1, bos_token_id=None)  # ids of WORDS' tokens


def sentences(count: int, length: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[3 + int(i)] for i in torch.randint(0, 61, (length,), generator=g)) for _ in range(count)]


def preferences():
    return datasets.Dataset.from_dict({"prompt": [s + " " for s in sentences(8, 5, 1)],
                                       "chosen": sentences(8, 4, 2), "rejected": sentences(8, 3, 3)})


def adapters(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora" in n}


def config(cls, output, steps, **options):
    defaults = dict(per_device_train_batch_size=4, save_steps=2, learning_rate=1e-2, use_cpu=True, report_to=[],
                    seed=0, logging_steps=100, disable_tqdm=True)
    return cls(str(output), max_steps=steps, **{**defaults, **options})


def logits(model, ids=torch.tensor([[5, 9, 13, 40, 7]])):
    """The class's forward: a model a Trainer has trained carries accelerate's autocast wrapper on the
    instance (TRL's configs default to bf16), which would round these logits."""
    with torch.no_grad():
        return type(model).forward(model.eval(), input_ids=ids).logits


def assert_adapter_only(checkpoint):
    files = sorted(p.name for p in checkpoint.iterdir())
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files, files
    assert not any(name.startswith(("model", "pytorch_model")) for name in files), files
    assert "trainer_state.json" in files and "optimizer.pt" in files, files


# ---- SFTTrainer ----

def sft(output, steps, trainer_class, resume=None):
    model = peftlite.inject(tiny_llama(), rank=4)
    data = datasets.Dataset.from_dict({"text": sentences(16, 10, 0)})
    args = config(trl.SFTConfig, output, steps, gradient_checkpointing=True,
                  gradient_checkpointing_kwargs={"use_reentrant": True})
    trainer = trainer_class(model=model, args=args, train_dataset=data, processing_class=tokenizer())
    trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    return model, trainer


def test_sft_trainer_checkpoints_the_adapter_alone_and_resumes_exactly(tmp_path):
    from peftlite.trl import SFTTrainer

    whole, _ = sft(tmp_path / "whole", 4, SFTTrainer)
    trained = adapters(whole)
    assert all(trained[n].abs().max() > 0 for n in trained if "lora_B" in n)  # every adapter got gradients
    checkpoint = tmp_path / "whole" / "checkpoint-2"
    assert_adapter_only(checkpoint)
    resumed, trainer = sft(tmp_path / "resumed", 4, SFTTrainer, resume=checkpoint)
    for name, value in adapters(resumed).items():
        assert torch.equal(value, trained[name]), name  # the uninterrupted run's weights
    trainer.save_model(str(tmp_path / "final"))
    expected = logits(resumed)
    torch.testing.assert_close(logits(peftlite.load_adapter(tiny_llama(), tmp_path / "final")), expected,
                               rtol=0, atol=0)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "final"))
    torch.testing.assert_close(logits(theirs), expected, rtol=1e-5, atol=1e-5)


def test_the_plain_sft_trainer_writes_adapter_only_checkpoints_and_refuses_to_resume_silently(tmp_path):
    sft(tmp_path / "plain", 2, trl.SFTTrainer)
    assert_adapter_only(tmp_path / "plain" / "checkpoint-2")
    with pytest.raises(ValueError):  # transformers' own error: it reads full weights or PEFT models only
        sft(tmp_path / "again", 4, trl.SFTTrainer, resume=tmp_path / "plain" / "checkpoint-2")


def test_sft_trainer_refuses_an_adapter_the_fused_loss_would_skip():
    from peftlite.trl import SFTTrainer

    model = peftlite.inject(tiny_llama(), rank=4, targets=["q_proj", "lm_head"])
    before = snapshot(model)
    args = config(trl.SFTConfig, "unused", 1)
    data = datasets.Dataset.from_dict({"text": sentences(4, 6, 0)})
    with pytest.raises(PeftliteError, match="output head.*lm_head.weight directly"):
        SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer())
    with pytest.raises(PeftliteError, match="peft_config"):
        SFTTrainer(model=peftlite.inject(tiny_llama(), rank=2), args=args, train_dataset=data,
                   processing_class=tokenizer(), peft_config=peft.LoraConfig(r=2))
    assert_unchanged(model, before)


# ---- DPOTrainer: the reference is the base model ----

def dpo_trainer(model, output, steps, **options):
    from peftlite.trl import DPOTrainer

    return DPOTrainer(model=model, args=config(trl.DPOConfig, output, steps, **options), train_dataset=preferences(),
                      processing_class=tokenizer())


def batch(trainer):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(4)])


def sequence_logps(model, inputs) -> torch.Tensor:
    """sum over completion tokens t of log softmax(logits[t-1])[token t], in float64, from plain logits."""
    with torch.no_grad():
        out = model.eval()(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    logp = torch.log_softmax(out.double()[:, :-1], dim=-1)
    tokens = inputs["input_ids"][:, 1:]
    picked = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return (picked * inputs["completion_mask"][:, 1:]).sum(dim=1)


def test_dpo_reference_is_the_base_model_exactly(tmp_path):
    from trl.trainer.utils import add_fused_lm_head

    base = tiny_llama()
    model = peftlite.inject(copy.deepcopy(base), rank=4)
    randomize_lora(model, std=0.3)  # the policy differs from the base from the start
    trainer = dpo_trainer(model, tmp_path, 1, bf16=False)  # TRL's default runs the reference under bf16 autocast
    assert isinstance(trainer.ref_model, peftlite.trl.BaseReference)
    inputs = batch(trainer)
    reference = torch.cat(trainer.compute_ref_log_probs(trainer.ref_model, inputs))
    torch.testing.assert_close(reference, sequence_logps(base, inputs).float())  # from the math, fp32 tolerance
    base.config.pad_token_id = model.config.pad_token_id
    add_fused_lm_head(base)
    assert torch.equal(reference, torch.cat(trainer.compute_ref_log_probs(base, inputs)))  # bit for bit
    policy = sequence_logps(model, inputs)
    assert (policy - reference.double()).abs().max() > 1e-2  # the adapters were really switched off
    assert model.training is False and adapters(model).keys()  # nothing else changed: still injected


def test_dpo_trains_the_adapter_against_a_fixed_reference_and_resumes_exactly(tmp_path):
    def run(output, resume=None):
        model = peftlite.inject(tiny_llama(), rank=4)
        trainer = dpo_trainer(model, output, 4)
        inputs = batch(trainer)
        before = torch.cat(trainer.compute_ref_log_probs(trainer.ref_model, inputs))
        trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
        after = torch.cat(trainer.compute_ref_log_probs(trainer.ref_model, inputs))
        assert torch.equal(before, after)  # the reference did not move with the adapter
        assert (sequence_logps(model, inputs) - after.double()).abs().max() > 1e-4  # the policy did
        return model

    whole = run(tmp_path / "whole")
    base = tiny_llama().state_dict()
    assert all(torch.equal(v, base[k]) for k, v in whole.state_dict().items() if "lora" not in k)
    assert_adapter_only(tmp_path / "whole" / "checkpoint-2")
    resumed = run(tmp_path / "resumed", resume=tmp_path / "whole" / "checkpoint-2")
    for name, value in adapters(whole).items():
        assert torch.equal(value, adapters(resumed)[name]), name


def dpo_run(output, pairs_per_process: int):
    """3 DPO steps over the 8 preference pairs, each step on all of them (split over the processes under
    ``torch.distributed.run``): every process count computes the same full-batch update."""
    model = peftlite.inject(tiny_llama(), rank=4)
    trainer = dpo_trainer(model, output, 3, per_device_train_batch_size=pairs_per_process, bf16=False,
                          save_strategy="no")
    trainer.train()
    return model, trainer


def test_dpo_on_two_ddp_processes_trains_like_one_on_the_whole_batch(tmp_path):
    from tests.test_training_stacks import launch

    done = launch(Path(__file__).resolve().parent / "dist_dpo.py", tmp_path / "two")
    assert done.returncode == 0, done.stderr[-3000:]
    single, _ = dpo_run(tmp_path / "one", pairs_per_process=8)
    loaded = peftlite.load_adapter(tiny_llama(), tmp_path / "two" / "final")
    for name, value in adapters(single).items():
        torch.testing.assert_close(dict(loaded.named_parameters())[name], value, rtol=1e-5, atol=1e-6)
    assert any((value - adapters(peftlite.inject(tiny_llama(), rank=4))[name]).abs().max() > 1e-3
               for name, value in adapters(single).items())  # it trained


def test_dpo_trainer_refuses_what_it_cannot_compute_and_leaves_the_model_unchanged(tmp_path, monkeypatch):
    cases = [
        (peftlite.inject(tiny_llama(), rank=4, dropout=0.1), {}, "disable_dropout=True.*dropout=0"),
        (peftlite.inject(tiny_llama(), rank=4, targets=["v_proj", "lm_head"]), {}, "output head"),
        (peftlite.inject(tiny_llama(), rank=4), {"fsdp": "full_shard"}, "FSDP or DeepSpeed.*ref_model="),
        (peftlite.inject(tiny_llama(), method="prefix", prefix_len=3), {}, "prefix.*ref_model="),
    ]
    for model, options, message in cases:
        before = snapshot(model)
        with pytest.raises(PeftliteError, match=message):
            dpo_trainer(model, tmp_path, 1, **options)
        assert_unchanged(model, before)
    model = peftlite.inject(tiny_llama(), rank=4)
    before = snapshot(model)
    with monkeypatch.context() as env, pytest.raises(PeftliteError, match="FSDP or DeepSpeed"):
        env.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets for an FSDP config
        dpo_trainer(model, tmp_path, 1)
    assert_unchanged(model, before)
    kept = dpo_trainer(peftlite.inject(tiny_llama(), rank=4, dropout=0.1), tmp_path, 1, disable_dropout=False)
    assert isinstance(kept.ref_model, peftlite.trl.BaseReference)


def test_dpo_with_an_explicit_reference_model_uses_it(tmp_path):
    from peftlite.trl import DPOTrainer

    reference = tiny_llama()
    trainer = DPOTrainer(model=peftlite.inject(tiny_llama(), rank=4, dropout=0.1), ref_model=reference,
                         args=config(trl.DPOConfig, tmp_path, 1, disable_dropout=False), train_dataset=preferences(),
                         processing_class=tokenizer())
    assert trainer.ref_model is reference
