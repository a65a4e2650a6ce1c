"""LoRAFunction: the low-rank update with a hand-written backward (CPU and GPU, any float dtype).

Against plain autograd over ``addmm`` calls it saves an [M, K] add and allocation in backward
(the low-rank term is accumulated into ``dx`` by ``addmm_``), keeps dropout as a list of dropped
positions instead of a dropped copy of ``x``, and skips every gradient nobody asked for.
Saved for backward: x (when A or W needs a gradient), t = h A^T [M, r] (when B does), the
dropped positions, and the parameters themselves. See ``reference.py`` for the math.
"""

import torch
from torch.autograd.function import once_differentiable

from .dropout import apply_drop, drop_positions


class LoRAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling: float, dropout: float):
        # x: [M, K] contiguous; returns y: [M, N]
        need_x, need_w, _, need_a, need_b = ctx.needs_input_grad[:5]
        drop = drop_positions(x.numel(), dropout, x.device) if dropout else None
        s = scaling / (1.0 - dropout)  # inverted dropout's 1/(1-p), folded into the scale
        y = torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())
        t = torch.mm(x if drop is None else apply_drop(x, drop), lora_A.t())  # [M, r]
        y.addmm_(t, lora_B.t(), alpha=s)
        ctx.save_for_backward(x if (need_a or need_w) else None, weight if need_x else None, lora_A, lora_B,
                              t if need_b else None, drop)
        ctx.s = s
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight, lora_A, lora_B, t, drop = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        dx = d_weight = d_bias = d_a = d_b = None
        if need_x or need_a:
            dt = torch.mm(grad, lora_B).mul_(ctx.s)  # [M, r]
        if need_b:
            d_b = torch.mm(grad.t(), t).mul_(ctx.s)  # [N, r]
        if need_a:
            d_a = torch.mm(dt.t(), x if drop is None else apply_drop(x, drop))  # [r, K]
        if need_x:
            dx = torch.mm(dt, lora_A)  # [M, K]: low-rank term first, dropout mask on it, then the big GEMM
            if drop is not None:
                dx.view(-1).index_fill_(0, drop, 0)
            dx.addmm_(grad, weight)
        if need_w:
            d_weight = torch.mm(grad.t(), x)
        if need_bias:
            d_bias = grad.sum(0)
        return dx, d_weight, d_bias, d_a, d_b, None, None


def lora_linear(x, weight, bias, lora_A, lora_B, scaling: float, dropout: float = 0.0):
    """``x [..., K] -> [..., N]`` through :class:`LoRAFunction`."""
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    y = LoRAFunction.apply(x2, weight, bias, lora_A, lora_B, scaling, dropout)
    return y.view(*x.shape[:-1], weight.shape[0])
