"""The low-rank update as ``torch.library`` custom ops with a hand-written backward (CPU and GPU).

``peftlite::lora_forward`` and ``peftlite::lora_backward`` are opaque to ``torch.compile``
(fake implementations give it the output shapes), so a model with injected LoRA compiles with
``fullgraph=True``; eager calls run the same code. Against plain autograd over ``addmm`` calls:

- the low-rank product is accumulated into the base output (``y.addmm_(t, B^T)``) and, in
  backward, into ``dx`` (``dx = (dt A) masked, then dx.addmm_(g, W)``): no [M, N] or [M, K] sum;
- dropout is a seed, not a mask: the dropped positions are drawn from it in forward and drawn
  again in backward (see ``dropout.py``), so nothing of size [M, K] is kept for it;
- gradients nobody asked for are not computed (the frozen weight's, and ``dx`` when ``x``
  does not require grad).

Saved for backward: x (when A needs a gradient), t = h A^T [M, r] (when B does), A, B, W (when
x needs a gradient) and the seed. See ``reference.py`` for the math.
"""

from typing import Optional  # not `X | None`: torch.library reads these annotations as op schemas (torch >= 2.4)

import torch
from torch import Tensor

from .dropout import draw_seed, drop_positions_from_seed, zero_positions

EMPTY = (0,)


def folded_weight_pays(rows: int, n: int, k: int, x: Tensor, dropout: float) -> bool:
    """Whether to fold the update into a temporary weight ``W' = W + s' B A`` for this call.

    ``x W'^T`` is one GEMM in place of the GEMM plus two skinny products whose [M, N] / [M, K]
    reads and writes dominate on CPU; building W' (twice: forward and backward) costs weight-sized
    traffic. So: CPU, float32/float64 (a 16-bit W' would round most of the update away), no
    dropout (h != x), and at least twice as many rows as the weight's larger side. Measured
    forward+backward over the frozen base, 2 threads, r=16, accumulated vs folded: M=2048,
    1024x1024: 1.136 vs 1.110; M=4096, 512x512: 1.274 vs 1.221; M=1024, 1024x1024: 1.135 vs 1.150;
    M=512, 512 -> 1365: 1.184 vs 1.329.
    """
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and not dropout
            and rows >= 2 * max(n, k))


def torch_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, scaling: float,
                  dropout: float, seed: Tensor) -> tuple[Tensor, Tensor]:
    """``(y, t)``: ``y = x W^T + b + s' t B^T`` [M, N] and ``t = h A^T`` [M, r], ``h`` = x with drops zeroed.

    ``s' = scaling / (1 - dropout)``: inverted dropout's factor, folded into the scale.
    """
    s = scaling / (1.0 - dropout)
    if folded_weight_pays(x.shape[0], weight.shape[0], weight.shape[1], x, dropout):
        folded = torch.addmm(weight, lora_B, lora_A, alpha=s)  # W' [N, K]
        y = torch.mm(x, folded.t()) if bias is None else torch.addmm(bias, x, folded.t())
        return y, torch.mm(x, lora_A.t())
    h = x
    if dropout:
        h = zero_positions(x.clone(), drop_positions_from_seed(x.numel(), dropout, seed, x.device))
    y = torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())
    t = torch.mm(h, lora_A.t())  # [M, r]
    y.addmm_(t, lora_B.t(), alpha=s)
    return y, t


def torch_backward(grad: Tensor, x: Optional[Tensor], weight: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                  t: Optional[Tensor], scaling: float, dropout: float, seed: Tensor, need_x: bool, need_a: bool,
                  need_b: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dA, dB)``; an output nobody needs is an empty tensor."""
    s = scaling / (1.0 - dropout)
    dx, d_a, d_b = (grad.new_empty(EMPTY) for _ in range(3))  # distinct: outputs may not alias
    folded = need_x and folded_weight_pays(grad.shape[0], grad.shape[1], lora_A.shape[1], grad, dropout)
    drop = None
    if dropout and (need_x or need_a):
        drop = drop_positions_from_seed(grad.shape[0] * lora_A.shape[1], dropout, seed, grad.device)
    if need_a or (need_x and not folded):
        dt = torch.mm(grad, lora_B).mul_(s)  # [M, r]
    if need_b:
        d_b = torch.mm(grad.t(), t).mul_(s)  # [N, r]
    if need_a:
        d_a = torch.mm(dt.t(), x if drop is None else zero_positions(x.clone(), drop))  # [r, K]
    if folded:
        dx = torch.mm(grad, torch.addmm(weight, lora_B, lora_A, alpha=s))  # g W', W' rebuilt, not kept
    elif need_x:
        dx = torch.mm(dt, lora_A)  # [M, K]: low-rank term first, dropout mask on it, then the big GEMM
        if drop is not None:
            zero_positions(dx, drop)
        dx.addmm_(grad, weight)
    return dx, d_a, d_b


def fake_forward(x, weight, bias, lora_A, lora_B, scaling, dropout, seed):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_A.shape[0])


def fake_backward(grad, x, weight, lora_A, lora_B, t, scaling, dropout, seed, need_x, need_a, need_b):
    rows, cols = grad.shape[0], lora_A.shape[1]
    return (grad.new_empty(rows, cols) if need_x else grad.new_empty(EMPTY),
            grad.new_empty(lora_A.shape) if need_a else grad.new_empty(EMPTY),
            grad.new_empty(lora_B.shape) if need_b else grad.new_empty(EMPTY))


def define_ops(name: str, forward_impl, backward_impl):
    """Register ``peftlite::<name>_forward`` / ``_backward`` custom ops with fakes and autograd; return the forward."""
    forward_op = torch.library.custom_op(f"peftlite::{name}_forward", forward_impl, mutates_args=())
    backward_op = torch.library.custom_op(f"peftlite::{name}_backward", backward_impl, mutates_args=())
    forward_op.register_fake(fake_forward)
    backward_op.register_fake(fake_backward)

    def setup_context(ctx, inputs, output):
        x, weight, bias, lora_A, lora_B, scaling, dropout, seed = inputs
        need_x, need_w, _, need_a, need_b = ctx.needs_input_grad[:5]
        ctx.save_for_backward(x if (need_a or need_w) else None, weight if need_x else None, lora_A, lora_B,
                              output[1] if need_b else None, seed)
        ctx.scaling, ctx.dropout = scaling, dropout

    def backward(ctx, grad, grad_t):
        x, weight, lora_A, lora_B, t, seed = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        grad = grad.contiguous()
        dx, d_a, d_b = backward_op(grad, x, weight, lora_A, lora_B, t, ctx.scaling, ctx.dropout, seed,
                                   need_x, need_a, need_b)
        d_weight = torch.mm(grad.t(), x) if need_w else None
        d_bias = grad.sum(0) if need_bias else None
        return (dx if need_x else None, d_weight, d_bias, d_a if need_a else None, d_b if need_b else None,
                None, None, None)

    forward_op.register_autograd(backward, setup_context=setup_context)
    return forward_op, backward_op


lora_forward, lora_backward = define_ops("lora", torch_forward, torch_backward)


def triton_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, scaling: float,
                   dropout: float, seed: Tensor) -> tuple[Tensor, Tensor]:
    from . import triton_lora  # imported on first use: triton is optional, and TRITON_INTERPRET is read at import

    return triton_lora.forward(x, weight, bias, lora_A, lora_B, scaling, dropout, seed)


def triton_backward(grad: Tensor, x: Optional[Tensor], weight: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                    t: Optional[Tensor], scaling: float, dropout: float, seed: Tensor, need_x: bool, need_a: bool,
                    need_b: bool) -> tuple[Tensor, Tensor, Tensor]:
    from . import triton_lora

    return triton_lora.backward(grad, x, weight, lora_A, lora_B, t, scaling, dropout, seed, need_x, need_a, need_b)


triton_lora_forward, triton_lora_backward = define_ops("lora_triton", triton_forward, triton_backward)


IMPLEMENTATIONS = {lora_forward: torch_forward, triton_lora_forward: triton_forward}


def lora_linear(x, weight, bias, lora_A, lora_B, scaling: float, dropout: float = 0.0, op=None):
    """``x [..., K] -> [..., N]`` through ``op`` (``peftlite::lora_forward`` by default); draws the dropout seed.

    Eager calls that need no gradient (inference, decoding) skip the custom-op and autograd
    wrappers, whose per-call cost (~10-35 us on CPU) would dominate small inputs.
    """
    op = op or lora_forward
    if not torch.compiler.is_compiling() and not (torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weight, bias, lora_A, lora_B))):
        op = IMPLEMENTATIONS[op]
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    y, _ = op(x2, weight, bias, lora_A, lora_B, float(scaling), float(dropout), draw_seed(dropout))
    return y.view(*x.shape[:-1], weight.shape[0])
