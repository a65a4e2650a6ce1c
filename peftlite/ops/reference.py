"""The low-rank update in plain PyTorch: THE definition of correct for every faster path.

    y = x W^T + b + scaling * ((keep * x) A^T) B^T

x: [M, K]   W: [N, K]   b: [N] or None   A: [r, K]   B: [N, r]   keep: [M, K] or None, the dropout
mask already divided by (1 - p). Backward, with g = dL/dy [M, N] and h = keep * x:
    dt = scaling * g B          [M, r]
    dB = scaling * g^T t        [N, r],  t = h A^T
    dA = dt^T h                 [r, K]
    dx = g W + keep * (dt A)    [M, K]
"""


def lora_forward(x, weight, bias, lora_A, lora_B, scaling, keep=None):
    h = x if keep is None else x * keep
    y = x @ weight.T + scaling * (h @ lora_A.T) @ lora_B.T
    return y if bias is None else y + bias


def lora_backward(grad, x, weight, lora_A, lora_B, scaling, keep=None):
    """(dx, dA, dB) for the frozen-weight case, written out from the formulas above."""
    h = x if keep is None else x * keep
    t = h @ lora_A.T
    dt = scaling * grad @ lora_B
    d_lora_B = scaling * grad.T @ t
    d_lora_A = dt.T @ h
    dh = dt @ lora_A
    dx = grad @ weight + (dh if keep is None else dh * keep)
    return dx, d_lora_A, d_lora_B
