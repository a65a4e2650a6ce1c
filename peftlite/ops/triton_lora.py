"""Triton kernels for the low-rank update (CUDA; CPU tensors through ``TRITON_INTERPRET=1``).

Forward, ``y = x W^T + b + s' t B^T`` with ``t = h A^T``, ``h = keep * x``, ``s' = s / (1 - p)``:

1. ``_t_kernel``: t [M, r] from x and A, dropout applied on the fly (``keep = rand(seed, m*K + k) >= p``,
   Philox via ``tl.rand``): x is read once, no mask or dropped copy is ever written;
2. ``_forward_kernel``: the base GEMM with the low-rank term in its epilogue
   (``acc = x W^T; acc += s' t B^T; acc += b``): one write of y, no separate LoRA output.

Up to ``DECODE_ROWS`` rows (decoding), ``_decode_kernel`` does both in one launch: every program
accumulates t beside its slice of the base GEMM (t is [M, r]: recomputing it per program costs
``r / BN`` of the base FLOPs and no extra launch).

Backward, with g = dL/dy (``dt = s' g B`` and ``dB = s' g^T t`` are small cuBLAS GEMMs):

3. ``_dx_kernel``: ``dx = g W + keep * (dt A)``: the low-rank term folded into the dx GEMM's epilogue;
4. ``_da_kernel``: ``dA = dt^T (keep * x)``, the mask redrawn from the seed.

Saved for backward: x, t, A, B, W and the seed, as on the torch path. Accumulation is float32;
inputs bf16, fp16 or fp32 (fp32 products in IEEE precision, not TF32). The rank is padded to a
power of two >= 16 for ``tl.dot``. Tiles and warps are fixed per kernel and dtype (``CUDA_TILES``), chosen
from sm_90 compiler output, not autotuned.
"""

from typing import Optional  # not `X | None`: these signatures become op schemas (torch >= 2.4)

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..errors import PeftliteError

MAX_OFFSET = 2**31  # offsets and dropout counters are int32: M*K, M*N and N*K stay below

DECODE_ROWS = 16  # up to this many rows (tokens), the forward is one launch (_decode_kernel)


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` with float32 accumulation; ``UPCAST`` (the interpreter, whose 16-bit dot is wrong) multiplies
    in float32, which for bf16/fp16 inputs gives the same exact products the GPU's tensor cores do."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _tile(ptr, rows, cols, stride, n_rows, n_cols):
    """Tile [rows, cols] of a row-major [n_rows, n_cols] matrix with row stride ``stride``; 0 outside it."""
    return tl.load(ptr + rows[:, None] * stride + cols[None, :],
                   mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)


@triton.jit
def _tile_t(ptr, rows, cols, stride, n_rows, n_cols):
    """The same matrix's tile transposed: [cols, rows] (e.g. a W^T tile from row-major W)."""
    return tl.load(ptr + rows[None, :] * stride + cols[:, None],
                   mask=(rows[None, :] < n_rows) & (cols[:, None] < n_cols), other=0.0)


@triton.jit
def _store_tile(ptr, value, rows, cols, stride, n_rows, n_cols):
    """Store ``value`` [rows, cols] into a row-major [n_rows, n_cols] matrix, in its dtype, inside its bounds."""
    tl.store(ptr + rows[:, None] * stride + cols[None, :], value.to(ptr.dtype.element_ty),
             mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))


@triton.jit
def _keep(seed, rows, cols, K, p):
    """The dropout keep-mask of elements (rows, cols) of an [M, K] input."""
    return tl.rand(seed, rows[:, None] * K + cols[None, :]) >= p


@triton.jit
def _t_kernel(x_ptr, a_ptr, t_ptr, M, K, R, stride_x, stride_a, stride_t, seed, p,
              DROPOUT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
              BR: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    ranks = tl.arange(0, BR)
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        x = _tile(x_ptr, rows, cols, stride_x, M, K)
        if DROPOUT:
            x = tl.where(_keep(seed, rows, cols, K, p), x, 0.0)
        a_t = _tile_t(a_ptr, ranks, cols, stride_a, R, K)  # A^T tile [BK, BR]
        acc += _dot(x, a_t, PRECISION, UPCAST)
    _store_tile(t_ptr, acc, rows, ranks, stride_t, M, R)


@triton.jit
def _forward_kernel(x_ptr, w_ptr, bias_ptr, t_ptr, b_ptr, y_ptr, M, N, K, R, stride_x, stride_w, stride_t,
                    stride_b, stride_y, scale, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    outs = tl.program_id(1) * BN + tl.arange(0, BN)
    ranks = tl.arange(0, BR)
    # The low-rank term and the bias first: the GEMM then accumulates onto them, so no second [BM, BN]
    # fp32 tile is alive beside the accumulator (that doubled register use and spilled).
    t = _tile(t_ptr, rows, ranks, stride_t, M, R)
    b_t = _tile_t(b_ptr, outs, ranks, stride_b, N, R)  # B^T tile [BR, BN]
    acc = scale * _dot(t, b_t, PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + outs, mask=outs < N, other=0.0).to(tl.float32)[None, :]
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        x = _tile(x_ptr, rows, cols, stride_x, M, K)
        w_t = _tile_t(w_ptr, outs, cols, stride_w, N, K)  # W^T tile [BK, BN]
        acc += _dot(x, w_t, PRECISION, UPCAST)
    _store_tile(y_ptr, acc, rows, outs, stride_y, M, N)


@triton.jit
def _decode_kernel(x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, y_ptr, t_ptr, M, N, K, R, stride_x, stride_w, stride_a,
                   stride_b, stride_y, stride_t, scale, seed, p, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
                   PRECISION: tl.constexpr, UPCAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                   BK: tl.constexpr, BR: tl.constexpr):
    """Few rows (M <= BM, decoding): one launch. Each program redoes the tiny t = h A^T beside its W slice."""
    rows = tl.arange(0, BM)
    outs = tl.program_id(0) * BN + tl.arange(0, BN)
    ranks = tl.arange(0, BR)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    t = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        x = _tile(x_ptr, rows, cols, stride_x, M, K)
        w_t = _tile_t(w_ptr, outs, cols, stride_w, N, K)
        acc += _dot(x, w_t, PRECISION, UPCAST)
        if DROPOUT:
            x = tl.where(_keep(seed, rows, cols, K, p), x, 0.0)
        a_t = _tile_t(a_ptr, ranks, cols, stride_a, R, K)
        t += _dot(x, a_t, PRECISION, UPCAST)
    t = t.to(t_ptr.dtype.element_ty)  # rounded as the two-launch path stores it
    b_t = _tile_t(b_ptr, outs, ranks, stride_b, N, R)
    acc += scale * _dot(t, b_t, PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + outs, mask=outs < N, other=0.0).to(tl.float32)[None, :]
    _store_tile(y_ptr, acc, rows, outs, stride_y, M, N)
    if tl.program_id(0) == 0:
        _store_tile(t_ptr, t, rows, ranks, stride_t, M, R)


@triton.jit
def _dx_kernel(g_ptr, w_ptr, dt_ptr, a_ptr, dx_ptr, M, N, K, R, stride_g, stride_w, stride_dt, stride_a, stride_dx,
               seed, p, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, BM: tl.constexpr,
               BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    ranks = tl.arange(0, BR)
    # The masked low-rank term first, then the GEMM accumulates onto it (one [BM, BK] fp32 tile alive).
    dt = _tile(dt_ptr, rows, ranks, stride_dt, M, R)
    a = _tile(a_ptr, ranks, cols, stride_a, R, K)
    acc = _dot(dt, a, PRECISION, UPCAST)
    if DROPOUT:
        acc = tl.where(_keep(seed, rows, cols, K, p), acc, 0.0)
    for n0 in range(0, N, BN):
        outs = n0 + tl.arange(0, BN)
        g = _tile(g_ptr, rows, outs, stride_g, M, N)
        w = _tile(w_ptr, outs, cols, stride_w, N, K)  # W tile [BN, BK]
        acc += _dot(g, w, PRECISION, UPCAST)
    _store_tile(dx_ptr, acc, rows, cols, stride_dx, M, K)


@triton.jit
def _da_kernel(dt_ptr, x_ptr, da_ptr, M, K, R, stride_dt, stride_x, stride_da, seed, p, DROPOUT: tl.constexpr,
               PRECISION: tl.constexpr, UPCAST: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
    cols = tl.program_id(0) * BK + tl.arange(0, BK)
    ranks = tl.arange(0, BR)
    acc = tl.zeros((BR, BK), dtype=tl.float32)
    for m0 in range(0, M, BM):
        rows = m0 + tl.arange(0, BM)
        dt_t = _tile_t(dt_ptr, rows, ranks, stride_dt, M, R)  # dt^T tile [BR, BM]
        x = _tile(x_ptr, rows, cols, stride_x, M, K)
        if DROPOUT:
            x = tl.where(_keep(seed, rows, cols, K, p), x, 0.0)
        acc += _dot(dt_t, x, PRECISION, UPCAST)
    _store_tile(da_ptr, acc, ranks, cols, stride_da, R, K)


@triton.jit
def _keep_kernel(out_ptr, M, K, seed, p, BM: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    _store_tile(out_ptr, _keep(seed, rows, cols, K, p), rows, cols, K, M, K)


# Tiles and warps per kernel on CUDA, (16-bit inputs, float32 inputs). Chosen from what the compiler
# reports for sm_90 (H100), tests/test_triton_sm90.py: no register spills in the aligned specializations,
# pipelined loads, shared memory within the SM's, and at least 128 programs at the reference shape
# (M = 8192, 4096 -> 4096; an H100 has 132 SMs): the skinny kernels split their long dimension finely.
# Runtime speed is not measured yet (no GPU was available): retune with benchmarks/gpu.sh.
CUDA_TILES = {
    "forward": ({"BM": 128, "BN": 128, "BK": 64}, {"BM": 128, "BN": 64, "BK": 32}),  # (M/BM) x (N/BN) programs
    "dx": ({"BM": 128, "BN": 128, "BK": 64}, {"BM": 128, "BN": 64, "BK": 32}),  # (M/BM) x (K/BK)
    "decode": ({"BM": DECODE_ROWS, "BN": 32, "BK": 128}, {"BM": DECODE_ROWS, "BN": 32, "BK": 64}),  # N/BN
    "t": ({"BM": 64, "BK": 64}, {"BM": 64, "BK": 32}),  # M/BM
    "da": ({"BM": 64, "BK": 32}, {"BM": 32, "BK": 32}),  # K/BK
}
CUDA_WARPS = 8
INTERPRETER_TILES = {"BM": 16, "BN": 16, "BK": 16}  # CPU tensors: small tiles, the interpreter is slow


def config(kernel: str, dtype: torch.dtype, rank: int, device: torch.device) -> dict:
    """Launch settings of ``kernel`` ("forward", "dx", "decode", "t", "da"): tile constexprs (the rank padded
    to a power of two >= 16 for ``tl.dot``) and, on CUDA, ``num_warps``."""
    tiles = CUDA_TILES[kernel][dtype == torch.float32] if device.type == "cuda" else {
        name: INTERPRETER_TILES[name] for name in CUDA_TILES[kernel][0]}
    if kernel == "decode":
        tiles = {**tiles, "BM": DECODE_ROWS}
    warps = {"num_warps": CUDA_WARPS} if device.type == "cuda" else {}
    return {**tiles, "BR": max(16, triton.next_power_of_2(rank)), **warps}


def precision(dtype: torch.dtype, device: torch.device) -> dict:
    """``tl.dot`` settings: IEEE fp32 products for fp32 (not TF32); float32 products under the interpreter."""
    return {"PRECISION": "ieee" if dtype == torch.float32 else "tf32",  # "tf32" is ignored for 16-bit inputs
            "UPCAST": device.type != "cuda"}


def seed32(seed: Tensor) -> int:
    return int(seed) & 0x7FFFFFFF


def check_size(m: int, k: int, n: int) -> None:
    """Refuse shapes whose element offsets (and dropout counters) would overflow the kernels' int32 arithmetic."""
    sizes = (("x [M, K]", m * k), ("y [M, N]", m * n), ("W [N, K]", n * k))
    for name, elements in sizes:
        if elements >= MAX_OFFSET:
            raise PeftliteError(
                f"the Triton LoRA kernels index with int32 offsets; {name} with M={m}, K={k}, N={n} has "
                f"{elements} elements (limit {MAX_OFFSET - 1}). Run this layer on the torch path "
                "(PEFTLITE_BACKEND=torch), or split the batch into smaller chunks.")


def forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, scaling: float,
            dropout: float, seed: Tensor) -> tuple[Tensor, Tensor]:
    """``(y, t)`` as ``autograd.lora_forward`` computes them; x [M, K] contiguous."""
    (M, K), N, R = x.shape, weight.shape[0], lora_A.shape[0]
    check_size(M, K, N)
    pr = precision(x.dtype, x.device)
    weight, lora_A, lora_B = weight.contiguous(), lora_A.contiguous(), lora_B.contiguous()
    t = x.new_empty(M, R)
    y = x.new_empty(M, N)
    if M <= DECODE_ROWS:
        c = config("decode", x.dtype, R, x.device)
        _decode_kernel[(triton.cdiv(N, c["BN"]),)](
            x, weight, bias if bias is not None else x, lora_A, lora_B, y, t, M, N, K, R, x.stride(0), weight.stride(0),
            lora_A.stride(0), lora_B.stride(0), y.stride(0), t.stride(0), scaling / (1.0 - dropout), seed32(seed),
            dropout, HAS_BIAS=bias is not None, DROPOUT=dropout > 0, **pr, **c)
        return y, t
    c = config("t", x.dtype, R, x.device)
    _t_kernel[(triton.cdiv(M, c["BM"]),)](x, lora_A, t, M, K, R, x.stride(0), lora_A.stride(0), t.stride(0),
                                          seed32(seed), dropout, DROPOUT=dropout > 0, **pr, **c)
    c = config("forward", x.dtype, R, x.device)
    grid = (triton.cdiv(M, c["BM"]), triton.cdiv(N, c["BN"]))
    _forward_kernel[grid](x, weight, bias if bias is not None else x, t, lora_B, y, M, N, K, R, x.stride(0),
                          weight.stride(0), t.stride(0), lora_B.stride(0), y.stride(0), scaling / (1.0 - dropout),
                          HAS_BIAS=bias is not None, **pr, **c)
    return y, t


def backward(grad: Tensor, x: Optional[Tensor], weight: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
             t: Optional[Tensor], scaling: float, dropout: float, seed: Tensor, need_x: bool, need_a: bool,
             need_b: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dA, dB)`` as ``autograd.lora_backward`` returns them (empty where not needed)."""
    s = scaling / (1.0 - dropout)
    (M, N), K, R = grad.shape, lora_A.shape[1], lora_A.shape[0]
    check_size(M, K, N)
    pr = precision(grad.dtype, grad.device)
    dx, d_a, d_b = (grad.new_empty((0,)) for _ in range(3))
    if need_b:
        d_b = torch.mm(grad.t(), t).mul_(s)  # [N, r]
    if not (need_x or need_a):
        return dx, d_a, d_b
    dt = torch.mm(grad, lora_B).mul_(s)  # [M, r]
    lora_A = lora_A.contiguous()
    if need_x:
        weight = weight.contiguous()
        dx = grad.new_empty(M, K)
        c = config("dx", grad.dtype, R, grad.device)
        grid = (triton.cdiv(M, c["BM"]), triton.cdiv(K, c["BK"]))
        _dx_kernel[grid](grad, weight, dt, lora_A, dx, M, N, K, R, grad.stride(0), weight.stride(0), dt.stride(0),
                         lora_A.stride(0), dx.stride(0), seed32(seed), dropout, DROPOUT=dropout > 0, **pr, **c)
    if need_a:
        d_a = torch.empty(R, K, dtype=lora_A.dtype, device=grad.device)
        c = config("da", grad.dtype, R, grad.device)
        _da_kernel[(triton.cdiv(K, c["BK"]),)](dt, x, d_a, M, K, R, dt.stride(0), x.stride(0), d_a.stride(0),
                                               seed32(seed), dropout, DROPOUT=dropout > 0, **pr, **c)
    return dx, d_a, d_b


def keep_mask(rows: int, cols: int, dropout: float, seed: Tensor, device) -> Tensor:
    """The [rows, cols] boolean keep-mask the kernels draw for ``seed``: for tests and the reference path."""
    out = torch.empty(rows, cols, dtype=torch.int8, device=device)
    _keep_kernel[(triton.cdiv(rows, 16), triton.cdiv(cols, 16))](out, rows, cols, seed32(seed), dropout, BM=16, BK=16)
    return out.bool()
