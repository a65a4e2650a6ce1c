"""Which implementation of the low-rank update an exact ``nn.Linear`` with LoRA runs.

- ``torch`` (default): ``autograd.torch_forward`` / ``torch_backward`` (``autograd.py``): hand-written
  backward, dropout as a seed; the ``peftlite::lora_forward`` custom op under ``torch.compile``
  (``fullgraph=True``), an ``autograd.Function`` in eager training.
- ``triton``: the Triton kernels of ``triton_lora.py`` (CUDA tensors; CPU tensors run through
  Triton's interpreter when ``TRITON_INTERPRET=1`` is set before peftlite first uses them), as
  ``peftlite::lora_triton_forward`` (the same three entries). Not measured on a GPU yet, so not
  the default anywhere.
- ``reference``: plain autograd over ``reference.lora_forward`` with the same dropout mask (drawn
  from the same seed as a dense mask): slow, obviously correct, for checking the fast path.

``PEFTLITE_BACKEND=reference|torch|triton`` chooses one for every layer; it is read at each
call, so it can be switched inside a process (tests do).
"""

import functools
import importlib.util
import os

import torch

from ..errors import PeftliteError
from .autograd import TORCH, TRITON
from .autograd import lora_linear as fused_lora_linear
from .dropout import draw_seed, drop_positions_from_seed
from .reference import lora_forward

BACKENDS = ("reference", "torch", "triton")
VARIABLE = "PEFTLITE_BACKEND"


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def chosen() -> str:
    """The backend ``PEFTLITE_BACKEND`` names; ``torch`` when it is unset or empty."""
    name = os.environ.get(VARIABLE) or "torch"
    if name not in BACKENDS:
        raise PeftliteError(f"{VARIABLE}={name!r}: expected one of {', '.join(BACKENDS)} (or unset for torch).")
    if name == "triton" and not triton_available():
        raise PeftliteError(f"{VARIABLE}=triton, but the triton package is not installed (pip install triton).")
    return name


def reference_lora_linear(x, weight, bias, lora_A, lora_B, scaling: float, dropout: float = 0.0):
    """``x [..., K] -> [..., N]`` by :func:`reference.lora_forward` under plain autograd."""
    x2 = x.reshape(-1, x.shape[-1])
    keep = None
    if dropout:
        keep = torch.full(x2.shape, 1.0 / (1.0 - dropout), dtype=x.dtype, device=x.device)
        keep.view(-1)[drop_positions_from_seed(keep.numel(), dropout, draw_seed(dropout), x.device)] = 0
    y = lora_forward(x2, weight, bias, lora_A, lora_B, scaling, keep)
    return y.view(*x.shape[:-1], weight.shape[0])


def lora_linear(x, weight, bias, lora_A, lora_B, scaling: float, dropout: float = 0.0):
    """``F.linear(x, W, b)`` plus the low-rank update, through the chosen backend."""
    name = chosen()
    if name == "reference":
        return reference_lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout)
    return fused_lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout, TRITON if name == "triton" else TORCH)
