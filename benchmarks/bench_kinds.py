"""A training step per layer kind: frozen base vs peftlite LoRA vs HF PEFT LoRA on the same model.

Models (built from configs or code, nothing downloaded):
- ``gpt2``: GPT-2 (transformers' ``Conv1D`` layers), LoRA on c_attn, c_proj and c_fc (PEFT:
  ``fan_in_fan_out=True``);
- ``conv``: a small conv net on 32x32 images, LoRA on its four ``nn.Conv2d`` layers;
- ``embedding``: the Llama of ``bench_model.py``, LoRA on ``embed_tokens`` and q/v projections.

One step = forward, loss, backward, AdamW on the trainable parameters; the frozen base does forward +
backward to its input (it has nothing to update). Contenders of one model are timed interleaved in one
run; reported: medians, the median of per-round ratios against the frozen base, and PEFT's time over
peftlite's. Writes benchmarks/results/kinds-<device>.json.

    python benchmarks/bench_kinds.py [--models gpt2 conv embedding --rank 16 --threads 2]
"""

import argparse
import copy
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import peftlite  # noqa: E402


class ConvNet(nn.Module):
    """Four 3x3 convolutions (two with stride 2) and a linear classifier over [B, 3, 32, 32] images."""

    def __init__(self, width: int):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(3, width, 3, padding=1), nn.Conv2d(width, 2 * width, 3, 2, 1),
                                    nn.Conv2d(2 * width, 2 * width, 3, padding=1),
                                    nn.Conv2d(2 * width, 4 * width, 3, 2, 1)])
        self.head = nn.Linear(4 * width, 10)

    def forward(self, images):
        x = images
        for conv in self.convs:
            x = F.relu(conv(x))
        return self.head(x.mean((2, 3)))


@dataclass
class Setup:
    """A model, the loss of one batch for the adapted models and for the frozen base, and LoRA targets.

    ``leaf``: the input that requires grad, so the frozen base does a backward too (for ``embedding`` the base
    takes the looked-up embeddings, the adapted models the token ids: their embedding layer has LoRA)."""

    model: nn.Module
    loss: Callable
    base_loss: Callable
    leaf: torch.Tensor
    targets: list[str]
    fan_in_fan_out: bool = False


def heads(args) -> int:
    return max(1, args.hidden // 64)  # head_dim 64


def gpt2(args) -> Setup:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=args.layers, n_embd=args.hidden, n_head=heads(args), vocab_size=args.vocab,
                        n_positions=args.seq, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    loss = lambda m: m(inputs_embeds=embeds, labels=ids).loss  # noqa: E731
    return Setup(model, loss, loss, embeds, ["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)


def conv(args) -> Setup:
    model = ConvNet(args.width)
    images = torch.randn(args.images, 3, 32, 32).requires_grad_(True)
    labels = torch.randint(0, 10, (args.images,))
    loss = lambda m: F.cross_entropy(m(images), labels)  # noqa: E731
    return Setup(model, loss, loss, images, [f"convs.{i}" for i in range(4)])


def embedding(args) -> Setup:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=heads(args),
                         num_key_value_heads=max(1, heads(args) // 2), max_position_embeddings=args.seq)
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    return Setup(model, lambda m: m(input_ids=ids, labels=ids).loss,
                 lambda m: m(inputs_embeds=embeds, labels=ids).loss, embeds, ["embed_tokens", "q_proj", "v_proj"])


MODELS = {"gpt2": gpt2, "conv": conv, "embedding": embedding}


def contenders(setup: Setup, args) -> dict:
    """The frozen base, peftlite's LoRA with trained-looking values, and PEFT's LoRA loaded from the same file."""
    from peft import PeftModel

    base = setup.model.requires_grad_(False)
    ours = peftlite.inject(copy.deepcopy(base), rank=args.rank, alpha=2 * args.rank, targets=setup.targets,
                           trainable=[])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    with tempfile.TemporaryDirectory() as directory:
        peftlite.save_adapter(ours, directory)  # PEFT reads the same adapter: same targets, values, settings
        theirs = PeftModel.from_pretrained(copy.deepcopy(base), directory, is_trainable=True)
    return {"base": base, "peftlite": ours, "peft": theirs}


def train_step(model, loss_of, leaf):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step():
        loss_of(model).backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        leaf.grad = None
    return step


def run(args) -> list[dict]:
    rows = []
    for which in args.models:
        torch.manual_seed(0)
        setup = MODELS[which](args)
        models = contenders(setup, args)
        for model in models.values():
            model.train()
        steps = {name: train_step(model, setup.base_loss if name == "base" else setup.loss, setup.leaf)
                 for name, model in models.items()}
        times = common.interleaved(steps, args.rounds, args.warmup)
        for name, stats in common.summarize(times, "base", "peft").items():
            rows.append({"model": which, "contender": name, "rank": args.rank, "dtype": args.dtype,
                         "trainable": sum(p.numel() for p in models[name].parameters() if p.requires_grad), **stats})
    return rows


COLUMNS = [("model", "<10", "model"), ("contender", "<9", "contender"), ("trainable", ">10,", "trainable"),
           ("median ms", ">10.1f", "median_ms"), ("x base", ">7.3f", "ratio_vs_base"),
           ("PEFT/this", ">9.3f", "peft_time_over_this")]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--width", type=int, default=32, help="conv net: channels of the first layer")
    parser.add_argument("--images", type=int, default=16, help="conv net: batch size")
    parser.add_argument("--rank", type=int, default=16)
    common.add_run_options(parser, rounds=20, warmup=3)
    args = parser.parse_args()
    if args.device != "cpu" or args.dtype != "float32":
        parser.error("bench_kinds.py builds its models on the CPU in float32; --device and --dtype are not "
                     "supported yet")
    common.run_and_report(args, run, COLUMNS, "kinds", "kinds")


if __name__ == "__main__":
    main()
