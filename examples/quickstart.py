"""peftlite quickstart: pretrain a tiny character-level transformer on Python's documentation,
then adapt it with LoRA to Python's own source code. Offline, CPU, a couple of minutes.

Both corpora ship with every Python install: the docs as ``pydoc_data.topics`` and the code
as the standard library's ``.py`` files. The metric is bits per character (lower is better)
on held-out source code. Writes ``out/adapter/`` (PEFT format), ``out/merged_model.safetensors``
and caches the pretrained base as ``out/base_model.safetensors``.

    python examples/quickstart.py [--steps 300] [--pretrain-steps 600]
"""

import argparse
import math
import os
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

import peftlite

OUT = Path("out")
CONTEXT, VOCAB = 64, 128


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a GELU MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)  # 3 x (B, T, H, hd)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class CharTransformer(nn.Module):
    def __init__(self, dim=128, layers=4, heads=4):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.pos = nn.Parameter(torch.zeros(CONTEXT, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, VOCAB)  # the output head: inject() leaves it alone

    def forward(self, ids):  # ids: (B, T) -> logits (B, T, VOCAB)
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def encode(text: str) -> torch.Tensor:
    return torch.tensor([min(ord(c), VOCAB - 1) for c in text], dtype=torch.long)


def python_docs() -> str:
    from pydoc_data.topics import topics
    return "\n".join(topics[key] for key in sorted(topics))


def python_source(limit: int = 1_500_000) -> str:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if not p.name.startswith("_"))
    text = "\n".join(p.read_text(errors="replace") for p in files)
    return text[:limit]


def batches(data: torch.Tensor, size: int, generator: torch.Generator):
    while True:
        starts = torch.randint(0, len(data) - CONTEXT - 1, (size,), generator=generator)
        chunk = torch.stack([data[s: s + CONTEXT + 1] for s in starts.tolist()])
        yield chunk[:, :-1], chunk[:, 1:]


def loss_of(model, x, y):
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


@torch.no_grad()
def bits_per_char(model, data: torch.Tensor, windows: int = 48) -> float:
    model.eval()
    starts = torch.linspace(0, len(data) - CONTEXT - 2, windows).long().tolist()
    x = torch.stack([data[s: s + CONTEXT] for s in starts])
    y = torch.stack([data[s + 1: s + CONTEXT + 1] for s in starts])
    return loss_of(model, x, y).item() / math.log(2)


@torch.no_grad()
def sample(model, prompt: str, length: int = 120, temperature: float = 0.7) -> str:
    """Continue ``prompt`` one character at a time (seeded, so runs are comparable)."""
    model.eval()
    generator = torch.Generator().manual_seed(0)
    ids = encode(prompt).unsqueeze(0)
    for _ in range(length):
        probs = torch.softmax(model(ids[:, -CONTEXT:])[0, -1] / temperature, dim=-1)
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator).view(1, 1)], dim=1)
    return "".join(chr(i) for i in ids[0].tolist())


def train(model, data, steps, lr, desc):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    source = batches(data, 32, torch.Generator().manual_seed(1))
    bar = tqdm(range(steps), desc=desc, ncols=90)
    for _ in bar:
        loss = loss_of(model, *next(source))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        bar.set_postfix(bpc=f"{loss.item() / math.log(2):.3f}")


def pretrained_base(docs: torch.Tensor, steps: int) -> CharTransformer:
    torch.manual_seed(0)
    model = CharTransformer()
    cache = OUT / "base_model.safetensors"
    if cache.exists():
        model.load_state_dict(load_file(cache))
        print(f"reusing pretrained base {cache} (delete it to pretrain again)")
        return model
    train(model, docs, steps, 3e-3, "pretrain on Python docs")
    save_file(model.state_dict(), cache)
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    OUT.mkdir(exist_ok=True)
    started = time.perf_counter()

    docs, code = encode(python_docs()), encode(python_source())
    split = int(0.9 * len(code))
    code_train, code_test = code[:split], code[split:]
    model = pretrained_base(docs, args.pretrain_steps)

    before = bits_per_char(model, code_test)
    docs_before = bits_per_char(model, docs[-200_000:])
    prompt = "    def "
    sample_before = sample(model, prompt)

    # --- the peftlite part ---------------------------------------------------------------------
    peftlite.inject(model, rank=args.rank, alpha=2 * args.rank, dropout=0.05)  # every Linear but `head`
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    train(model, code_train, args.steps, 3e-3, "LoRA on Python source")
    after = bits_per_char(model, code_test)
    sample_after = sample(model, prompt)

    peftlite.save_adapter(model, OUT / "adapter")  # PEFT format: adapter_model.safetensors + adapter_config.json
    probe = code_test[:CONTEXT].unsqueeze(0)
    with torch.no_grad():
        unmerged = model(probe)
        peftlite.merge(model)
        merged = model(probe)
    plain = peftlite.unload(model)  # plain nn.Linear again, original state_dict keys
    save_file(plain.state_dict(), OUT / "merged_model.safetensors")
    # ---------------------------------------------------------------------------------------------

    print(f"bits/char on held-out Python source: {before:.3f} before LoRA -> {after:.3f} after "
          f"({100 * (before - after) / before:.1f}% lower)")
    print(f"bits/char on Python docs (pretraining domain, base model): {docs_before:.3f}")
    print(f"sample before LoRA: {sample_before!r}")
    print(f"sample after LoRA:  {sample_after!r}")
    print(f"max |merged - unmerged| logits: {(merged - unmerged).abs().max().item():.2e}")
    print(f"wrote {OUT / 'adapter'}/ and {OUT / 'merged_model.safetensors'} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
