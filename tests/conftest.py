"""Test session setup: without a GPU, Triton kernels run through Triton's interpreter on CPU tensors.

TRITON_INTERPRET is read when kernels are defined, so it is set before anything imports them.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
