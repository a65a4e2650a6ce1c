"""combine_adapters against float64 references written from the definitions (task arithmetic, Eckart-Young,
TIES-merging, DARE), on every LoRA kind; the combination is a new, inactive adapter."""

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftlite
from peftlite import PeftliteError
from tests.models import assert_unchanged, snapshot

WEIGHTS = {"a": 0.7, "b": -0.4}


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(9, 7)
        self.conv1d = Conv1D(6, 9)
        self.embedding = nn.Embedding(10, 5)
        self.conv = nn.Conv2d(3, 4, 3)


def model_with_two(seed=0):
    torch.manual_seed(seed)
    model = Model()
    peftlite.inject(model, rank=3, alpha=5, targets=["linear", "conv1d", "embedding", "conv"], name="a")
    peftlite.inject(model, rank=2, alpha=3, rslora=True, targets=["linear", "conv1d", "conv"], name="b")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora" in name:
                p.normal_(0, 0.5)
    return model


def delta(layer, name):
    """D = scaling * B A as a matrix [out, in * kernel], float64, from the definition."""
    a = layer.lora_A[name].detach().double().flatten(1)
    b = layer.lora_B[name].detach().double().flatten(1)
    return layer.lora_settings[name].scaling * b @ a


def layers(model):
    return {n: model.get_submodule(n) for n in ("linear", "conv1d", "embedding", "conv")}


def present(layer):
    return [(n, w) for n, w in WEIGHTS.items() if n in layer.lora_settings]


def test_cat_is_the_weighted_sum_of_the_deltas_and_is_added_inactive():
    model = model_with_two()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    errors = peftlite.combine_adapters(model, WEIGHTS, name="ab", how="cat")
    assert errors == dict.fromkeys(["linear", "conv1d", "embedding", "conv"], 0.0)
    assert peftlite.active_adapters(model) == ["a", "b"]
    assert {n: p.requires_grad for n, p in model.named_parameters() if ".ab" not in n} == before
    for path, layer in layers(model).items():
        expected = sum(w * delta(layer, n) for n, w in present(layer))
        assert layer.lora_settings["ab"].rank == sum(layer.lora_settings[n].rank for n, _ in present(layer))
        torch.testing.assert_close(delta(layer, "ab"), expected, rtol=1e-6, atol=1e-6 * expected.abs().max())
    x = torch.randn(4, 9)
    peftlite.set_adapter(model, "ab")
    reference = x.double() @ (model.linear.weight.double() + WEIGHTS["a"] * delta(model.linear, "a")
                              + WEIGHTS["b"] * delta(model.linear, "b")).T + model.linear.bias.double()
    torch.testing.assert_close(model.linear(x).double(), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rank", [1, 2, 5])
def test_svd_reports_the_relative_error_it_makes(rank):
    model = model_with_two()
    errors = peftlite.combine_adapters(model, WEIGHTS, name="s", how="svd", rank=rank)
    for path, layer in layers(model).items():
        exact = sum(w * delta(layer, n) for n, w in present(layer))
        measured = float((delta(layer, "s") - exact).norm() / exact.norm())
        assert math.isclose(errors[path], measured, rel_tol=1e-4, abs_tol=1e-6), path
        s = torch.linalg.svdvals(exact)  # Eckart-Young: the best rank-k error
        best = float(s[rank:].square().sum().sqrt() / s.square().sum().sqrt())
        assert math.isclose(errors[path], best, rel_tol=1e-6, abs_tol=1e-9), path


def ties_reference(deltas, weights, density):
    """TIES (Yadav et al. 2023) on weighted task deltas, entry by entry in plain Python loops."""
    trimmed = []
    for d, w in zip(deltas, weights):
        flat = d.flatten().tolist()
        keep = max(1, math.ceil(density * len(flat)))
        order = sorted(range(len(flat)), key=lambda i: -abs(flat[i]))[:keep]
        kept = [0.0] * len(flat)
        for i in order:
            kept[i] = w * flat[i]
        trimmed.append(kept)
    out = []
    for i in range(len(trimmed[0])):
        values = [t[i] for t in trimmed]
        total = sum(values)
        sign = (total > 0) - (total < 0)
        agree = [v for v in values if v != 0 and ((v > 0) - (v < 0)) == sign]
        out.append(sum(agree) / len(agree) if agree else 0.0)
    return torch.tensor(out, dtype=torch.float64).view_as(deltas[0])


def test_ties_matches_the_papers_definition_then_the_best_truncation():
    model = model_with_two()
    full = 12  # above every layer's rank bound: no truncation, so the combination itself is compared
    errors = peftlite.combine_adapters(model, WEIGHTS, name="t", how="ties", density=0.3, rank=full)
    for path, layer in layers(model).items():
        expected = ties_reference([delta(layer, n) for n, _ in present(layer)], [w for _, w in present(layer)], 0.3)
        assert errors[path] < 1e-12
        torch.testing.assert_close(delta(layer, "t"), expected, rtol=1e-5, atol=1e-6 * expected.abs().max())


def test_dare_drops_and_rescales_each_delta_then_sums():
    model = model_with_two()
    peftlite.combine_adapters(model, {"a": 1.0}, name="d", how="dare", drop=0.5, rank=12, seed=3)
    for path, layer in layers(model).items():
        got, original = delta(layer, "d"), delta(layer, "a")
        kept = got.abs() > 1e-6 * original.abs().max()
        torch.testing.assert_close(got[kept], original[kept] / 0.5, rtol=1e-5, atol=1e-6)  # survivors x 1/(1-p)
        share = kept.double().mean().item()
        assert 0.2 < share < 0.8, (path, share)  # about half dropped
    again = model_with_two()
    peftlite.combine_adapters(again, {"a": 1.0}, name="d", how="dare", drop=0.5, rank=12, seed=3)
    assert torch.equal(again.linear.lora_A["d"], model.linear.lora_A["d"])  # the seed decides


def test_bad_requests_raise_and_change_nothing():
    model = model_with_two()
    before = snapshot(model)
    for call, match in (
        (lambda: peftlite.combine_adapters(model, {"z": 1.0}, name="c"), "'z' is not a LoRA adapter"),
        (lambda: peftlite.combine_adapters(model, {}, name="c"), "weights=\\{\\}"),
        (lambda: peftlite.combine_adapters(model, {"a": float("nan")}, name="c"), "weight of 'a' is nan"),
        (lambda: peftlite.combine_adapters(model, {"a": True}, name="c"), "weight of 'a' is True"),
        (lambda: peftlite.combine_adapters(model, WEIGHTS, name="a"), "name='a' is taken"),
        (lambda: peftlite.combine_adapters(model, WEIGHTS, name="c", how="linear"), "how='linear'"),
        (lambda: peftlite.combine_adapters(model, WEIGHTS, name="c", how="cat", rank=2), "rank= applies"),
        (lambda: peftlite.combine_adapters(model, WEIGHTS, name="c", how="ties", density=0), "density=0"),
        (lambda: peftlite.combine_adapters(model, WEIGHTS, name="c", how="dare", drop=1.0), "drop=1.0"),
    ):
        with pytest.raises(PeftliteError, match=match):
            call()
        assert_unchanged(model, before)
