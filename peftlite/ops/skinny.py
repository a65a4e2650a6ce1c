"""``a^T b`` for a tall, skinny ``a`` [M, r] and a tall ``b`` [M, K]: the adapters' weight gradients.

``dA = dt^T h`` [r, K] and ``dB^T = t^T g`` [r, N] contract over the M rows of the batch. MKL
runs that shape (r = 8..32 output rows, a contraction thousands long) at little more than one
thread's speed: ``mm`` at M=2048, K=1024, r=16 took 0.67..0.83 ms with 2 threads, 0.81 ms with
1. Cut into c row blocks, the same sum is one batched product ``a_i^T b_i`` [c, r, K], whose
blocks the threads share, plus a sum over c:

    a^T b = sum_i a_i^T b_i,   a_i = a[i R : (i+1) R],  b_i = b[i R : (i+1) R]

Measured on CPU (AMD EPYC, torch 2.13, fp32; this over one ``mm``), 2 threads: M=2048 K=1024
r=16 0.69, r=8 0.68, r=32 0.70; M=2048 K=4096 r=16 0.69; M=8192 K=4096 r=16 0.68; M=600..3000
0.66..0.94. With 3 blocks on 2 threads one thread idles through the last: M=1000 went 0.96..1.35,
so c is a multiple of the thread count (2 blocks there: 0.71..0.85). With 1 thread it loses
(1.03..1.35), so one thread keeps ``mm``; so do ranks over 32 (r=64: 0.85..1.15, 1.26 at M=1000).
Only fp32 on CPU: fp64 measured 1.03..1.10 (MKL threads that one well); in 16-bit each partial
sum would be rounded to the input dtype; on GPUs cuBLAS splits the contraction itself.
Machines with more threads follow the same rule (blocks in whole rounds of the thread count), unmeasured.
The block count follows the thread count, so dA and dB round differently under different thread
counts (within fp32 rounding of the same sum; tests hold both to a float64 reference).
"""

from typing import Optional

import torch
from torch import Tensor

BLOCK_ROWS = 256  # rows per block at least: smaller blocks cost more in the sum than they gain
MAX_BLOCKS = 32  # bounds the partial sums [c, r, K] at 32 x the result
MAX_RANK = 32


def blocks(rows: int, rank: int, like: Tensor) -> int:
    """How many row blocks to sum over; 1 means one plain ``mm``."""
    if like.device.type != "cpu" or like.dtype != torch.float32 or rank > MAX_RANK:
        return 1
    threads = torch.get_num_threads()
    if threads < 2:
        return 1
    count = min(rows // BLOCK_ROWS, MAX_BLOCKS)
    return count - count % threads  # whole rounds of blocks: a round with idle threads loses


def transposed_product(a: Tensor, b: Tensor, count: Optional[int] = None) -> Tensor:
    """``a^T b`` [r, K] for ``a`` [M, r] and ``b`` [M, K] (both row-major), as a sum over ``count`` row blocks
    (default: :func:`blocks`'s rule; ``benchmarks/bench_skinny.py`` times others against it)."""
    rows, rank = a.shape
    count = blocks(rows, rank, b) if count is None else min(count, rows)
    if count < 2:
        return torch.mm(a.t(), b)
    size = rows // count
    main = size * count
    partial = torch.bmm(a[:main].view(count, size, rank).transpose(1, 2), b[:main].view(count, size, -1))  # [c, r, K]
    out = partial.sum(0)
    if main < rows:  # the last rows % count rows
        out.addmm_(a[main:].t(), b[main:])
    return out
