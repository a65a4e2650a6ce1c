"""A small real transfer task that ships offline: scikit-learn's 8x8 digits (1,797 scans).

A two-block transformer reads each image as 8 rows of 8 pixels. It is pretrained on digits 0-4,
then adapted to digits 5-9 with a new head, training on a few examples per class.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Bidirectional multi-head attention through F.scaled_dot_product_attention (peftlite's PrefixAttention)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = heads, heads, dim // heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):  # (B, L, D)
        batch, length, _ = x.shape
        split = lambda t: t.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # noqa: E731
        y = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)))
        return self.o_proj(y.transpose(1, 2).reshape(batch, length, -1))


class MLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.up_proj, self.down_proj = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.hidden_size = dim

    def forward(self, x):
        return self.down_proj(F.gelu(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), MLP(dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DigitTransformer(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4, layers: int = 2, classes: int = 5):
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.position = nn.Parameter(torch.randn(8, dim) / math.sqrt(dim))
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, images):  # (B, 8, 8) rows of pixels
        x = self.embed(images) + self.position
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(1))


def load_digits_split(seed: int = 0, shots: int = 30):
    """((pretrain x, y), (adapt x, y), (test x, y)): 0-4 for pretraining, 5-9 split into few-shot train and test."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(data.target)
    old = labels < 5
    generator = torch.Generator().manual_seed(seed)
    new_index = torch.nonzero(~old).flatten()
    new_index = new_index[torch.randperm(len(new_index), generator=generator)]
    adapt = torch.cat([new_index[labels[new_index] == c][:shots] for c in range(5, 10)])
    test = new_index[~torch.isin(new_index, adapt)]
    return (images[old], labels[old]), (images[adapt], labels[adapt] - 5), (images[test], labels[test] - 5)


def train(model, images, labels, steps: int, lr: float, seed: int = 0, batch: int = 64):
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        index = torch.randint(0, len(images), (min(batch, len(images)),), generator=generator)
        loss = F.cross_entropy(model(images[index]), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return model


@torch.no_grad()
def accuracy(model, images, labels) -> float:
    return (model(images).argmax(-1) == labels).float().mean().item()
