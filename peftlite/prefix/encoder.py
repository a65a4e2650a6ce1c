"""PrefixEncoder: learned prefix keys and values for every attention layer (Li & Liang 2021, arXiv 2101.00190).

Every adapted attention layer ``l`` attends to ``prefix_len`` extra key/value positions before
the sequence::

    K_l = [Pk_l ; x W_k]    V_l = [Pv_l ; x W_v]    Pk_l, Pv_l: [heads, prefix_len, head_dim]

Without ``projection_dim`` the prefixes are one trainable table ``prefix`` [P, L * 2 * H * hd],
laid out per position as (layer, key|value, head, head_dim): the layout of PEFT's
``prompt_embeddings``. With ``projection_dim`` they are reparameterized as in the paper,
``MLP(E) = W2 tanh(W1 E + b1) + b2`` with ``E`` [P, H * hd] trainable, which trains more stably;
:meth:`PrefixEncoder.eject` replaces the MLP by its output for inference and saving.
"""

import torch
from torch import nn

from ..errors import PeftliteError, check_positive_int


def check_prefix_options(num_layers, num_heads, head_dim, prefix_len, projection_dim) -> None:
    for name, value in (("num_layers", num_layers), ("num_heads", num_heads), ("head_dim", head_dim)):
        check_positive_int(name, value)
    check_positive_int("prefix_len", prefix_len, "Li & Liang use 10 to 200 prefix positions")
    if projection_dim is not None:
        check_positive_int("projection_dim", projection_dim, "the reparameterization MLP's hidden size, e.g. 512; "
                           "or None for a plain table")


class PrefixEncoder(nn.Module):
    """Prefix keys and values for ``num_layers`` attention layers of ``num_heads`` key/value heads.

    ``forward(layer)`` returns layer ``layer``'s prefixes as one tensor [2, H, P, hd] (keys,
    values); ``forward()`` returns all of them, [L, 2, H, P, hd]. Nothing is cached: each call
    derives the prefixes from the current parameters, so they never go stale while training.

    >>> encoder = PrefixEncoder(num_layers=2, num_heads=4, head_dim=8, prefix_len=5)
    >>> encoder(1).shape
    torch.Size([2, 4, 5, 8])
    """

    def __init__(self, num_layers: int, num_heads: int, head_dim: int, prefix_len: int = 10,
                 projection_dim: int | None = None):
        super().__init__()
        check_prefix_options(num_layers, num_heads, head_dim, prefix_len, projection_dim)
        self.num_layers, self.num_heads, self.head_dim = num_layers, num_heads, head_dim
        self.prefix_len, self.projection_dim = prefix_len, projection_dim
        self.layer_width = 2 * num_heads * head_dim  # one layer's keys and values at one position
        if projection_dim is None:
            self.prefix = nn.Parameter(torch.randn(prefix_len, num_layers * self.layer_width))
        else:
            self.embedding = nn.Parameter(torch.randn(prefix_len, num_heads * head_dim))
            self.transform = nn.Sequential(nn.Linear(num_heads * head_dim, projection_dim), nn.Tanh(),
                                           nn.Linear(projection_dim, num_layers * self.layer_width))

    def flat(self, layer: int | None = None) -> torch.Tensor:
        """The prefixes as PEFT lays them out: [P, L * 2 * H * hd], or [P, 2 * H * hd] for one layer."""
        columns = slice(None) if layer is None else slice(layer * self.layer_width, (layer + 1) * self.layer_width)
        if self.projection_dim is None:
            return self.prefix[:, columns]
        hidden = self.transform[1](self.transform[0](self.embedding))  # [P, projection_dim]
        out = self.transform[2]
        return nn.functional.linear(hidden, out.weight[columns], out.bias[columns])

    def forward(self, layer: int | None = None) -> torch.Tensor:
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)
                                  or not 0 <= layer < self.num_layers):
            raise PeftliteError(f"layer={layer!r}: expected an integer from 0 to {self.num_layers - 1} (one layer's "
                                "prefixes), or None (all layers).")
        flat = self.flat(layer)
        layers = self.num_layers if layer is None else 1
        prefixes = flat.view(self.prefix_len, layers, 2, self.num_heads, self.head_dim)
        prefixes = prefixes.permute(1, 2, 3, 0, 4)  # (L, 2, H, P, hd)
        return prefixes if layer is None else prefixes[0]

    @torch.no_grad()
    def eject(self) -> "PrefixEncoder":
        """Replace the reparameterization MLP by the table it produces; outputs stay the same.

        Afterwards the encoder holds one trainable ``prefix`` [P, L * 2 * H * hd], as PEFT saves
        it. A no-op without ``projection_dim``. Returns ``self``.
        """
        if self.projection_dim is not None:
            table = self.flat().detach().clone()
            del self.embedding, self.transform
            self.prefix = nn.Parameter(table)
            self.projection_dim = None
        return self

    def extra_repr(self) -> str:
        return (f"num_layers={self.num_layers}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"prefix_len={self.prefix_len}, projection_dim={self.projection_dim}")
