"""``a^T b`` for a tall, skinny ``a`` [M, r] and a tall ``b`` [M, K]: the adapters' weight gradients.

``dA = dt^T h`` [r, K] and ``dB^T = t^T g`` [r, N] contract over the M rows of the batch. MKL
runs that shape (r = 8..32 output rows, a contraction thousands long) at little more than one
thread's speed: ``mm`` at M=2048, K=1024, r=16 took 0.67..0.83 ms with 2 threads, 0.81 ms with
1. Cut into c row blocks, the same sum is one batched product ``a_i^T b_i`` [c, r, K], whose
blocks the threads share, plus a sum over c:

    a^T b = sum_i a_i^T b_i,   a_i = a[i R : (i+1) R],  b_i = b[i R : (i+1) R]

The rule (``blocks``): on CPU, fp32, with T >= 2 threads, rank <= 128 and M >= 256 T rows, c = T:
one block per thread (``torch.bmm`` hands each thread one block, MKL runs it on that thread alone).
Measured by ``benchmarks/bench_skinny.py`` (``benchmarks/results/skinny-amd-epyc.json``: AMD EPYC,
torch 2.13, fp32, M=512..8192, K=1024/4096; this over one ``mm``, median of per-round ratios): at 2
threads the rule took 0.53..0.68 at rank 4, 0.59..0.73 at 8, 0.70..0.84 at 16, 0.78..0.94 at 32,
0.84..0.94 at 64 and 0.94..1.00 at 128: a median 0.01 and at most 0.10 (rank 4, M=2048, K=4096) above
the best block count timed (2, 4, 8 or 16 blocks). More blocks lose at rank 128 (16 blocks: up to
1.64x; the partial sums [c, r, K] outgrow the caches). With 1 thread blocking does not pay
(0.95..1.12), so one thread keeps ``mm``. Only fp32 on CPU: fp64 measured 1.03..1.10 (MKL threads
that one well); in 16-bit each partial sum would be rounded to the input dtype; on GPUs cuBLAS splits
the contraction itself. Machines with more threads follow the same rule, unmeasured: run the
benchmark there with ``--threads 4 8 16``. The block count follows the thread count, so dA and dB
round differently under different thread counts (within fp32 rounding of the same sum; tests hold
both to a float64 reference).
"""

from typing import Optional

import torch
from torch import Tensor

BLOCK_ROWS = 256  # rows per block at least: smaller blocks cost more in the sum than they gain
MAX_RANK = 128  # measured up to here (the partial sums are [threads, r, K])


def blocks(rows: int, rank: int, like: Tensor) -> int:
    """How many row blocks to sum over (one per thread); 1 means one plain ``mm``."""
    if like.device.type != "cpu" or like.dtype != torch.float32 or rank > MAX_RANK:
        return 1
    threads = torch.get_num_threads()
    return threads if threads >= 2 and rows >= threads * BLOCK_ROWS else 1


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
