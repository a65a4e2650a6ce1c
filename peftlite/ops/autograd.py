"""The low-rank update as ``torch.library`` custom ops with a hand-written backward (CPU and GPU).

``peftlite::lora_forward`` and ``peftlite::lora_backward`` are opaque to ``torch.compile``
(fake implementations give it the output shapes), so a model with injected LoRA dropout compiles with
``fullgraph=True`` and draws the same dropout as eager. Without dropout, ``torch.compile`` traces the
update as plain ops instead (:func:`traced_lora_linear`), which inductor fuses with the rest of the
model. Eager training runs the same two functions as a plain ``autograd.Function`` (cheaper to call
than the op), and eager calls that need no gradient call the forward directly.
Against plain autograd over ``addmm`` calls:

- the big GEMMs accumulate onto the low-rank terms (``y = s' t B^T + b``, then
  ``y.addmm_(x, W^T)``; in backward ``dx = (dt A)`` masked, then ``dx.addmm_(g, W)``): the [M, N]
  and [M, K] results are written once and re-read only inside the GEMM, no separate sum;
- with dropout, the dropped copy h of x lives in the output's storage (forward: y's, before y is
  written; backward: dx's, before dx is written), so no extra [M, K] buffer is allocated;
- dropout is a seed, not a mask: the dropped positions are drawn from it in forward and drawn
  again in backward (see ``dropout.py``), so nothing of size [M, K] is kept for it;
- gradients nobody asked for are not computed (the frozen weight's, and ``dx`` when ``x``
  does not require grad).

Saved for backward: x (when A needs a gradient), t = h A^T [M, r] (when B does), A, B, W (when
x needs a gradient) and the seed. See ``reference.py`` for the math.
"""

from typing import NamedTuple, Optional  # not `X | None`: torch.library reads annotations as schemas (torch 2.4)

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .dropout import draw_seed, drop_positions_padded, spare_slot

EMPTY = (0,)


def torch_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, scaling: float,
                  dropout: float, seed: Tensor) -> tuple[Tensor, Tensor]:
    """``(y, t)``: ``y = x W^T + b + s' t B^T`` [M, N] and ``t = h A^T`` [M, r], ``h`` = x with drops zeroed.

    ``s' = scaling / (1 - dropout)``: inverted dropout's factor, folded into the scale.
    """
    s = scaling / (1.0 - dropout)
    h, y = x, None
    if dropout:
        rows, cols, n = *x.shape, weight.shape[0]
        y, y_flat = spare_slot(rows, n, x)
        drop = drop_positions_padded(x.numel(), dropout, int(seed), x.device)
        # h (x with drops zeroed) is built in y's storage when it fits: y is written only after t = h A^T
        h, h_flat = (y_flat[: x.numel()].view_as(x), y_flat) if n >= cols else spare_slot(rows, cols, x)
        h.copy_(x)
        h_flat.index_fill_(0, drop, 0)
    t = torch.mm(h, lora_A.t())  # [M, r]
    if bias is None:
        y = torch.mm(t, lora_B.t() * s, out=y)
    else:
        y = torch.addmm(bias, t, lora_B.t(), alpha=s, out=y)
    return y.addmm_(x, weight.t()), t  # the big GEMM accumulates: no extra pass over y


def torch_backward(grad: Tensor, x: Optional[Tensor], weight: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                  t: Optional[Tensor], scaling: float, dropout: float, seed: Tensor, need_x: bool, need_a: bool,
                  need_b: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dA, dB)``; an output nobody needs is an empty tensor."""
    s = scaling / (1.0 - dropout)
    dx, d_a, d_b = (grad.new_empty(EMPTY) for _ in range(3))  # distinct: outputs may not alias
    drop = None
    if dropout and (need_x or need_a):
        drop = drop_positions_padded(grad.shape[0] * lora_A.shape[1], dropout, int(seed), grad.device)
    if need_a or need_x:
        dt = torch.mm(grad, lora_B).mul_(s)  # [M, r]
    if need_b:
        d_b = torch.mm(t.t(), grad).mul_(s).t().contiguous()  # [N, r], as (t^T g)^T: g read along its rows
    if need_x or (need_a and drop is not None):  # one [M, K] buffer: first h (x with drops zeroed), then dx
        buffer, flat = spare_slot(grad.shape[0], lora_A.shape[1], grad)
    if need_a:
        h = x
        if drop is not None:
            h = buffer.copy_(x)
            flat.index_fill_(0, drop, 0)
        d_a = torch.mm(dt.t(), h)  # [r, K]
    if need_x:  # low-rank term first, dropout mask on it, then the big GEMM accumulates
        dx = torch.mm(dt, lora_A, out=buffer)
        if drop is not None:
            flat.index_fill_(0, drop, 0)
        dx.addmm_(grad, weight)
    return dx, d_a, d_b


def fake_forward(x, weight, bias, lora_A, lora_B, scaling, dropout, seed):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_A.shape[0])


def fake_backward(grad, x, weight, lora_A, lora_B, t, scaling, dropout, seed, need_x, need_a, need_b):
    rows, cols = grad.shape[0], lora_A.shape[1]
    return (grad.new_empty(rows, cols) if need_x else grad.new_empty(EMPTY),
            grad.new_empty(lora_A.shape) if need_a else grad.new_empty(EMPTY),
            grad.new_empty(lora_B.shape) if need_b else grad.new_empty(EMPTY))


class Kernels(NamedTuple):
    """One implementation of the update, three ways in: ``op`` (traced by ``torch.compile``), ``function``
    (eager training: a plain ``autograd.Function``, without the custom op's per-call dispatch cost) and
    ``forward`` (eager calls that need no gradient)."""

    op: object
    backward_op: object
    function: type
    forward: object


def saving(ctx, inputs, output) -> None:
    """Save what backward needs: x only for dA (or a weight gradient), W only for dx, t only for dB."""
    x, weight, bias, lora_A, lora_B, scaling, dropout, seed = inputs
    need_x, need_w, _, need_a, need_b = ctx.needs_input_grad[:5]
    ctx.save_for_backward(x if (need_a or need_w) else None, weight if need_x else None, lora_A, lora_B,
                          output[1] if need_b else None, seed)
    ctx.scaling, ctx.dropout = scaling, dropout


def backward_with(run):
    """The autograd backward for ``saving``'s context, running the update's backward through ``run``."""

    def backward(ctx, grad, grad_t):
        x, weight, lora_A, lora_B, t, seed = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        grad = grad.contiguous()
        dx, d_a, d_b = run(grad, x, weight, lora_A, lora_B, t, ctx.scaling, ctx.dropout, seed, need_x, need_a, need_b)
        d_weight = torch.mm(grad.t(), x) if need_w else None
        d_bias = grad.sum(0) if need_bias else None
        return (dx if need_x else None, d_weight, d_bias, d_a if need_a else None, d_b if need_b else None,
                None, None, None)
    return backward


def define_ops(name: str, forward_impl, backward_impl) -> Kernels:
    """Register ``peftlite::<name>_forward`` / ``_backward`` custom ops (fakes, autograd) and the eager twin."""
    forward_op = torch.library.custom_op(f"peftlite::{name}_forward", forward_impl, mutates_args=())
    backward_op = torch.library.custom_op(f"peftlite::{name}_backward", backward_impl, mutates_args=())
    forward_op.register_fake(fake_forward)
    backward_op.register_fake(fake_backward)
    forward_op.register_autograd(backward_with(backward_op), setup_context=saving)

    class Eager(torch.autograd.Function):  # forward(ctx, ...) style: a separate setup_context costs ~3x per call
        @staticmethod
        def forward(ctx, *inputs):
            output = forward_impl(*inputs)
            saving(ctx, inputs, output)
            ctx.mark_non_differentiable(output[1])
            return output

        backward = staticmethod(once_differentiable(backward_with(backward_impl)))  # no double backward

    Eager.__name__ = Eager.__qualname__ = f"{name}_function"
    return Kernels(forward_op, backward_op, Eager, forward_impl)


TORCH = define_ops("lora", torch_forward, torch_backward)


def triton_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, scaling: float,
                   dropout: float, seed: Tensor) -> tuple[Tensor, Tensor]:
    from . import triton_lora  # imported on first use: triton is optional, and TRITON_INTERPRET is read at import

    return triton_lora.forward(x, weight, bias, lora_A, lora_B, scaling, dropout, seed)


def triton_backward(grad: Tensor, x: Optional[Tensor], weight: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                    t: Optional[Tensor], scaling: float, dropout: float, seed: Tensor, need_x: bool, need_a: bool,
                    need_b: bool) -> tuple[Tensor, Tensor, Tensor]:
    from . import triton_lora

    return triton_lora.backward(grad, x, weight, lora_A, lora_B, t, scaling, dropout, seed, need_x, need_a, need_b)


TRITON = define_ops("lora_triton", triton_forward, triton_backward)


def needs_gradient(x, weight, bias, lora_A, lora_B) -> bool:
    """Whether autograd will want a backward through this call (grad mode on, some input requiring grad)."""
    return torch.is_grad_enabled() and (x.requires_grad or lora_A.requires_grad or lora_B.requires_grad
                                        or weight.requires_grad or (bias is not None and bias.requires_grad))


def traced_lora_linear(x, weight, bias, lora_A, lora_B, scaling: float):
    """``F.linear(x, W, b) + s (x A^T) B^T`` in plain ops, for ``torch.compile`` without dropout.

    Visible to inductor, which fuses the sum and the scale into the GEMMs' epilogues and plans the
    backward with the rest of the model; the opaque custom op would keep it from doing so (compiled
    step times in benchmarks/results/model-*.json, ``--compile``).
    """
    return torch.nn.functional.linear(x, weight, bias) + torch.nn.functional.linear(x, lora_A).matmul(lora_B.t()) \
        * scaling


def lora_linear(x, weight, bias, lora_A, lora_B, scaling: float, dropout: float = 0.0, kernels: Kernels = TORCH):
    """``x [..., K] -> [..., N]`` through ``kernels`` (the torch path by default); draws the dropout seed.

    Under ``torch.compile`` plain ops (no dropout) or the custom op run; eager training runs the same code as an
    ``autograd.Function`` and eager calls that need no gradient (inference, decoding) call it
    directly: the custom-op wrappers cost ~100 us per forward+backward on CPU, which dominates
    small layers.
    """
    if torch.compiler.is_compiling():
        if not dropout and kernels is TORCH:
            return traced_lora_linear(x, weight, bias, lora_A, lora_B, float(scaling))
        run = kernels.op
    elif needs_gradient(x, weight, bias, lora_A, lora_B):
        run = kernels.function.apply
    else:
        run = kernels.forward
    x2 = x.reshape(-1, x.shape[-1]).contiguous()  # a no-op when already contiguous
    y, _ = run(x2, weight, bias, lora_A, lora_B, float(scaling), float(dropout), draw_seed(dropout))
    # Not a view, as F.linear's output is not: FSDP2 warns on views (an in-place op on one would skip its
    # pre-backward hook). Safe here: y itself is not saved for backward, so nothing sees it change.
    return y if x.dim() == 2 else torch.ops.aten._unsafe_view(y, (*x.shape[:-1], weight.shape[0]))
