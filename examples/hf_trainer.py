"""LoRA with the Hugging Face Trainer: adapter-only checkpoints, resuming, the final adapter. CPU, seconds.

A tiny Llama built from a config learns a fixed set of token sequences; checkpoints every 10 steps hold
the adapter alone (plus the trainer's own state); a second run resumes from the first checkpoint and ends
with the same adapter as the uninterrupted run.

    python examples/hf_trainer.py [--out out/trainer]
"""

import argparse
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

import peftlite
from peftlite.hf import Trainer


class Sequences(torch.utils.data.Dataset):
    def __init__(self):
        self.ids = torch.randint(0, 128, (64, 16), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return peftlite.inject(LlamaForCausalLM(config), rank=8, alpha=16, dropout=0.05)


def train(out: Path, resume=None):
    adapted = model()
    args = TrainingArguments(str(out), max_steps=20, save_steps=10, per_device_train_batch_size=8, learning_rate=3e-3,
                             use_cpu=True, report_to=[], logging_steps=10, seed=0)
    trainer = Trainer(model=adapted, args=args, train_dataset=Sequences())
    trainer.train(resume_from_checkpoint=resume)
    return adapted, trainer


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/trainer"))
    args = parser.parse_args()
    whole, trainer = train(args.out / "run")
    checkpoint = args.out / "run" / "checkpoint-10"
    size = sum(p.stat().st_size for p in checkpoint.glob("adapter_*"))
    print(f"checkpoint-10: {sorted(p.name for p in checkpoint.iterdir())}; the adapter is {size / 1024:.0f} KiB")
    resumed, _ = train(args.out / "resumed", resume=str(checkpoint))
    same = all(torch.equal(a, b) for (n, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters())
               if "lora" in n)
    print(f"resumed from checkpoint-10: the same adapter as the uninterrupted run: {same}")
    trainer.save_model(args.out / "final")  # the adapter alone, PEFT's layout
    print(f"final adapter in {args.out / 'final'}: load it with peftlite.load_adapter or PeftModel.from_pretrained")


if __name__ == "__main__":
    main()
