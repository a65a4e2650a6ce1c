"""Tiny real models for the tests (built from configs, nothing downloaded) and shared helpers."""

import contextlib

import torch
from torch import nn

import peftlite
from peftlite.lora import lora_layers
from peftlite.ops.dropout import draw_seed, drop_positions_from_seed

# Relative tolerance per dtype: a few unit roundoffs, since each path rounds a handful of times.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2.5e-3, torch.bfloat16: 2e-2}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@contextlib.contextmanager
def num_threads(count: int):
    """torch's intra-op thread count set to ``count`` inside the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def keep_mask(shape, p, seed):
    """The inverted-dropout mask LoRALinear draws after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    keep = torch.full(shape, 1 / (1 - p), dtype=torch.float64)
    keep.view(-1)[drop_positions_from_seed(keep.numel(), p, draw_seed(p))] = 0
    return keep


def assert_within_rounding(actual: torch.Tensor, expected: torch.Tensor, magnitude: torch.Tensor,
                           dtype: torch.dtype) -> None:
    """|actual - expected| <= tol(dtype) * magnitude, elementwise.

    ``magnitude`` is the same formula evaluated on absolute values (|x| |W|^T + ...): the standard
    forward-error bound of sums of products, so cancellation is accounted for and nothing else is.
    """
    error = (actual.detach().to(torch.float64) - expected.to(torch.float64)).abs()
    bound = TOLERANCE[dtype] * magnitude.to(torch.float64) + torch.finfo(dtype).tiny
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    worst = (error - bound).argmax() if error.numel() else None
    assert worst is None or (error <= bound).all(), (
        f"{int((error > bound).sum())} of {error.numel()} elements beyond {TOLERANCE[dtype]:g} x magnitude; worst: "
        f"got {actual.flatten()[worst].item()}, expected {expected.flatten()[worst].item()}, "
        f"magnitude {magnitude.flatten()[worst].item()}")


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """assert_close with the dtype's tolerance, absolute part scaled by the reference's magnitude."""
    tol = TOLERANCE[dtype]
    expected = expected.to(torch.float64)
    scale = max(expected.abs().max().item(), 1e-30)
    torch.testing.assert_close(actual.to(torch.float64), expected, rtol=tol, atol=tol * scale)


class TinyMLP(nn.Module):
    """Two hidden Linear layers, a LayerNorm and a classifier head named ``head``."""

    def __init__(self, dims=(12, 24, 20), classes=5):
        super().__init__()
        self.fc1 = nn.Linear(dims[0], dims[1])
        self.norm = nn.LayerNorm(dims[1])
        self.fc2 = nn.Linear(dims[1], dims[2], bias=False)
        self.head = nn.Linear(dims[2], classes)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(self.norm(torch.relu(self.fc1(x))))))


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    config.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**config)).eval()


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(config).eval()


def randomize_lora(model: nn.Module, std: float = 0.2, seed: int = 1) -> None:
    """Give every LoRA layer a nonzero B (zero B would hide most bugs)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            noise = torch.randn(layer.lora_B["default"].shape, generator=generator, dtype=torch.float64) * std
            layer.lora_B["default"].copy_(noise)


def snapshot(model: nn.Module) -> dict:
    """Everything a failed call must leave as it was: modules, values (bits), requires_grad flags."""
    return {
        "modules": [(name, type(m), id(m)) for name, m in model.named_modules(remove_duplicate=False)],
        "values": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "hooks": [(name, len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["grad"] == before["grad"]
    assert after["hooks"] == before["hooks"]
    assert after["values"].keys() == before["values"].keys()
    for key, value in before["values"].items():
        assert same_bits(after["values"][key], value), key


BIT_VIEWS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bits (a NaN equals the same NaN); meta tensors hold no values: dtype and shape only."""
    if (a.dtype, a.shape, a.device) != (b.dtype, b.shape, b.device):
        return False
    if a.is_meta:
        return True
    if a.is_floating_point():
        bits = BIT_VIEWS[a.element_size()]
        return torch.equal(a.contiguous().view(bits), b.contiguous().view(bits))
    return torch.equal(a, b)


def assert_load_refused(model: nn.Module, directory, match: str) -> None:
    """load_adapter raises PeftliteError matching ``match`` and leaves ``model`` exactly as it was."""
    import pytest

    before = snapshot(model)
    with pytest.raises(peftlite.PeftliteError, match=match):
        peftlite.load_adapter(model, directory)
    assert_unchanged(model, before)


def injected_llama(rank: int = 4, seed: int = 0, **kwargs):
    model = tiny_llama(seed)
    peftlite.inject(model, rank=rank, **kwargs)
    randomize_lora(model)
    return model
