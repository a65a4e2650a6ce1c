"""ops.reference: the written-out backward equals float64 autograd through the forward."""

import pytest
import torch

from peftlite.ops.reference import lora_backward, lora_forward


@pytest.mark.parametrize("with_keep", [False, True])
def test_backward_formulas_match_autograd(with_keep):
    g = torch.Generator().manual_seed(0)
    m, k, n, r, s = 7, 5, 6, 3, 1.7

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    x, weight, bias, a, b = rand(m, k).requires_grad_(), rand(n, k), rand(n), rand(r, k).requires_grad_(), rand(n, r)
    b.requires_grad_()
    keep = (torch.rand(m, k, generator=g) > 0.3).double() / 0.7 if with_keep else None
    grad = rand(m, n)
    lora_forward(x, weight, bias, a, b, s, keep).backward(grad)
    dx, da, db = lora_backward(grad, x.detach(), weight, a.detach(), b.detach(), s, keep)
    torch.testing.assert_close(dx, x.grad)
    torch.testing.assert_close(da, a.grad)
    torch.testing.assert_close(db, b.grad)
