"""Several adapters in one model: every kind with two LoRA adapters against float64 references from the math,
switching, disabling (bit-identical to the base), deleting, merging by name, per-row batches (forward and
backward), bottleneck adapters by name, summary."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import peftlite
from peftlite import PeftliteError
from tests.models import DTYPES, TinyMLP, assert_unchanged, same_bits, snapshot, tiny_llama
from tests.test_kinds import CASES, IDS, Host, assert_close_dtype

SETTINGS = {"a": dict(rank=3, alpha=5.0), "b": dict(rank=2, alpha=4.0, rslora=True)}


def scaling(name):
    s = SETTINGS[name]
    return s["alpha"] / (s["rank"] ** 0.5 if s.get("rslora") else s["rank"])


def two_adapters(case, dtype=torch.float32, seed=0, names=("a", "b")) -> Host:
    """The case's module in a Host with adapters ``names`` (settings above), A and B nonzero."""
    torch.manual_seed(seed)
    host = Host(case.build().to(dtype))
    for name in names:
        peftlite.inject(host, targets=["layer"], name=name, **SETTINGS[name])
    with torch.no_grad():
        for name in names:
            for part in (host.layer.lora_A[name], host.layer.lora_B[name]):
                part.copy_(torch.randn(part.shape) * 0.5)
    return host


def reference(case, layer, x, names):
    """float64: base(x) + sum over ``names`` of that adapter's term (each reference is affine in its term)."""
    x64 = x.double() if x.is_floating_point() else x
    zero_a = torch.zeros_like(layer.lora_A["a"], dtype=torch.float64)
    zero_b = torch.zeros_like(layer.lora_B["a"], dtype=torch.float64)
    base = case.reference(layer, x64, zero_a, zero_b, 0.0)
    total = base
    for n in names:
        a, b = (t.detach().double() for t in (layer.lora_A[n], layer.lora_B[n]))
        total = total + case.reference(layer, x64, a, b, scaling(n)) - base
    return total


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_active_adapters_add_up_and_each_alone_matches_the_reference(case, dtype):
    host = two_adapters(case, dtype)
    x = case.input(dtype)
    assert peftlite.active_adapters(host) == ["a", "b"]
    assert_close_dtype(host(x), reference(case, host.layer, x, ["a", "b"]), dtype)
    for name in ("a", "b"):
        peftlite.set_adapter(host, name)
        assert_close_dtype(host(x), reference(case, host.layer, x, [name]), dtype)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_each_adapter_gives_the_outputs_and_gradients_of_a_model_holding_only_it(case):
    multi = two_adapters(case)
    x = case.input(torch.float32)
    g = torch.randn(multi(x).shape)
    for name in ("a", "b"):
        torch.manual_seed(0)
        single = Host(case.build())
        single.load_state_dict({k: v for k, v in multi.state_dict().items() if "lora" not in k})
        peftlite.inject(single, targets=["layer"], name=name, **SETTINGS[name])
        with torch.no_grad():
            single.layer.lora_A[name].copy_(multi.layer.lora_A[name])
            single.layer.lora_B[name].copy_(multi.layer.lora_B[name])
        peftlite.set_adapter(multi, name)
        multi.zero_grad(set_to_none=True)
        (multi(x) * g).sum().backward()
        (single(x) * g).sum().backward()
        for part in ("lora_A", "lora_B"):
            mine, theirs = getattr(multi.layer, part)[name], getattr(single.layer, part)[name]
            torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-5, atol=1e-6)
        other = "b" if name == "a" else "a"
        assert multi.layer.lora_A[other].grad is None and not multi.layer.lora_A[other].requires_grad
        torch.testing.assert_close(multi(x), single(x), rtol=1e-5, atol=1e-6)


def test_only_active_adapters_require_and_get_gradients():
    model = TinyMLP()
    peftlite.inject(model, rank=2, targets=["fc1", "fc2"], name="a")
    peftlite.inject(model, rank=3, targets=["fc1"], name="b")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "fc1.lora_A.a", "fc1.lora_B.a", "fc2.lora_A.a", "fc2.lora_B.a", "fc1.lora_A.b", "fc1.lora_B.b"}
    peftlite.set_adapter(model, "b")
    model(torch.randn(4, 12)).sum().backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == {"fc1.lora_A.b", "fc1.lora_B.b"}
    assert type(model.fc2).__name__ == "LoRALinear" and model.fc2.lora_active == ()


@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [c for c in CASES if c.name != "Linear subclass"], ids=lambda c: c.name)
def test_disable_adapters_is_bit_identical_to_the_base_and_restores_on_exceptions(case, dtype, merged):
    torch.manual_seed(0)
    plain = Host(case.build().to(dtype)).eval()  # as two_adapters builds it
    x = case.input(dtype)
    base = plain(x)
    host = two_adapters(case, dtype, seed=0).eval()
    adapted = host(x)
    if merged:
        peftlite.merge(host)
    merged_weight = host.layer.weight.detach().clone()
    with peftlite.disable_adapters(host):
        assert same_bits(host(x), base)
    assert same_bits(host.layer.weight, merged_weight)
    with pytest.raises(ZeroDivisionError):
        with peftlite.disable_adapters(host):
            assert same_bits(host(x), base)
            1 / 0
    assert same_bits(host.layer.weight, merged_weight) and host.layer.merged == merged
    assert_close_dtype(host(x), adapted.double(), dtype)


def test_changes_inside_a_context_are_refused_and_change_nothing():
    model = TinyMLP()
    peftlite.inject(model, rank=2, name="a")
    peftlite.inject(model, rank=2, name="b")
    for context in (peftlite.disable_adapters(model), peftlite.adapter_per_row(model, ["a", None])):
        with context:
            before = snapshot(model)
            for call in (lambda: peftlite.set_adapter(model, "a"), lambda: peftlite.delete_adapter(model, "a"),
                         lambda: peftlite.inject(model, rank=2, name="c"), lambda: peftlite.merge(model),
                         lambda: peftlite.unload(model), lambda: peftlite.disable_adapters(model).__enter__()):
                with pytest.raises(PeftliteError, match="inside peftlite"):
                    call()
                assert_unchanged(model, before)


def test_set_adapter_refuses_bad_names_and_merged_models_changing_nothing():
    model = TinyMLP()
    peftlite.inject(model, rank=2, name="a")
    peftlite.inject(model, rank=2, targets=["fc1"], name="b")
    before = snapshot(model)
    for names, match in ((["c"], "'c' is not an adapter of this model; its adapters are \\['a', 'b'\\]"),
                         ([], "expected an adapter name or a non-empty list"), (["a", "a"], "lists an adapter twice"),
                         (3, "names=3"), ([None], "None is not an adapter")):
        with pytest.raises(PeftliteError, match=match):
            peftlite.set_adapter(model, names)
        assert_unchanged(model, before)
    peftlite.merge(model)
    before = snapshot(model)
    with pytest.raises(PeftliteError, match="holds merged adapter.*unmerge"):
        peftlite.set_adapter(model, "a")
    assert_unchanged(model, before)


def test_injecting_a_name_twice_is_an_error_and_other_names_join_the_active_set():
    model = TinyMLP()
    peftlite.inject(model, rank=2, name="a")
    before = snapshot(model)
    with pytest.raises(PeftliteError, match="already has a LoRA adapter named 'a'"):
        peftlite.inject(model, rank=4, name="a")
    assert_unchanged(model, before)
    peftlite.set_adapter(model, "a")
    peftlite.inject(model, method="adapter", targets=["fc2"], name="bn")
    assert peftlite.active_adapters(model) == ["a", "bn"]
    assert model.fc1.lora_A["a"].requires_grad and model.fc2.adapter["bn"].down.weight.requires_grad


def test_merge_by_name_keeps_the_rest_unmerged_and_unmerge_by_name_is_bit_exact():
    torch.manual_seed(0)
    model = TinyMLP().eval()
    originals = {k: v.clone() for k, v in model.state_dict().items()}
    for name, rank in (("a", 2), ("b", 3)):
        peftlite.inject(model, rank=rank, name=name)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    x = torch.randn(5, 12)
    both = model(x)
    peftlite.merge(model, names="a")
    assert model.fc1.lora_merge.names == ("a",)
    torch.testing.assert_close(model(x), both, rtol=1e-5, atol=1e-6)
    peftlite.merge(model)  # the active rest joins
    assert model.fc1.lora_merge.names == ("a", "b")
    torch.testing.assert_close(model(x), both, rtol=1e-5, atol=1e-6)
    peftlite.unmerge(model, "a")
    assert model.fc1.lora_merge.names == ("b",)
    torch.testing.assert_close(model(x), both, rtol=1e-5, atol=1e-6)
    peftlite.unmerge(model)
    for key, value in originals.items():
        assert same_bits(model.state_dict()[key], value), key
    peftlite.set_adapter(model, "b")
    with pytest.raises(PeftliteError, match="adapter 'a' is not active"):
        peftlite.merge(model, names=["a"])


def test_unload_merges_the_named_adapters_and_drops_the_others():
    torch.manual_seed(0)
    model = TinyMLP().eval()
    for name in ("a", "b"):
        peftlite.inject(model, rank=2, name=name)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    x = torch.randn(3, 12)
    peftlite.set_adapter(model, "b")
    only_b = model(x)
    peftlite.set_adapter(model, ["a", "b"])
    plain = peftlite.unload(model, names=["b"])
    assert type(plain.fc1) is nn.Linear
    torch.testing.assert_close(plain(x), only_b, rtol=1e-5, atol=1e-6)


def test_delete_adapter_leaves_no_trace():
    torch.manual_seed(0)
    model = TinyMLP()
    keys = set(model.state_dict())
    peftlite.inject(model, rank=2, name="a")
    state_a = set(model.state_dict())
    peftlite.inject(model, rank=3, targets=["fc1"], name="b")
    peftlite.inject(model, method="adapter", targets=["fc2"], name="b")
    peftlite.delete_adapter(model, "b")
    assert set(model.state_dict()) == state_a and peftlite.adapter_names(model) == ["a"]
    assert type(model.fc2).__name__ == "LoRALinear" and "lora_settings" in model.fc2.__dict__
    peftlite.delete_adapter(model, "a")
    assert set(model.state_dict()) == keys and type(model.fc1) is nn.Linear
    with pytest.raises(PeftliteError, match="has no adapters"):
        peftlite.delete_adapter(model, "a")


def test_summary_counts_parameters_per_adapter_and_in_all():
    model = TinyMLP()
    total = sum(p.numel() for p in model.parameters())
    peftlite.inject(model, rank=2, targets=["fc1"], name="a")  # 2 * (12 + 24)
    peftlite.inject(model, rank=1, targets=["fc1", "fc2"], name="b")  # (12 + 24) + (24 + 20)
    peftlite.set_adapter(model, "b")
    report = peftlite.summary(model)
    assert report.adapters == {"a": 72, "b": 80} and report.active == ("b",)
    assert report.total == total + 152 and report.trainable == 80
    text = str(report)
    assert "trainable params: 80 || all params:" in text and "a" in text and "no" in text


# ---- per-row batches ----

ROW_CASES = [c for c in CASES if c.name in ("Linear", "Conv1D", "Embedding", "Conv2d", "Linear subclass")]


def rows_input(case, rows: int, tokens: int, dtype):
    """[rows, tokens, ...] for token layers (tokens 1 and 3 take the stacked form, 9 the gathered one)."""
    if case.name == "Embedding":
        return torch.randint(0, 11, (rows, tokens))
    shape = case.input(dtype).shape
    if case.name.startswith("Conv") and case.name != "Conv1D":
        return torch.randn(rows, *shape[1:]).to(dtype)
    return torch.randn(rows, tokens, shape[-1]).to(dtype)


@settings(max_examples=40, deadline=None)
@given(case=st.sampled_from(ROW_CASES), dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
       assignment=st.lists(st.sampled_from(["a", "b", None]), min_size=1, max_size=6),
       tokens=st.sampled_from([1, 3, 9]), seed=st.integers(0, 99))
def test_each_row_of_a_mixed_batch_equals_that_row_alone_forward_and_backward(case, dtype, assignment, tokens,
                                                                              seed):
    host = two_adapters(case, dtype, seed=seed)
    x = rows_input(case, len(assignment), tokens, dtype)
    with peftlite.adapter_per_row(host, assignment):
        mixed = host(x)
        g = torch.randn(mixed.shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
        if any(assignment):  # all None: nothing trains
            (mixed * g).sum().backward()
    grads = {(p, n): getattr(host.layer, p)[n].grad for p in ("lora_A", "lora_B") for n in ("a", "b")}
    expected_grads = {key: None for key in grads}
    for name in ("a", "b", None):
        rows = [i for i, n in enumerate(assignment) if n == name]
        if not rows:
            continue
        expected = reference(case, host.layer, x[rows], [] if name is None else [name])
        assert_close_dtype(mixed[rows], expected, dtype)
        if name is None:
            continue
        host.zero_grad()
        peftlite.set_adapter(host, name)
        (host(x[rows]) * g[rows]).sum().backward()
        for part in ("lora_A", "lora_B"):
            expected_grads[(part, name)] = getattr(host.layer, part)[name].grad.clone()
    for key, got in grads.items():
        want = expected_grads[key]
        if want is None:  # no row used that adapter: no gradient, or an exact zero
            assert got is None or not got.any(), key
        else:
            assert_close_dtype(got, want.double(), dtype)


class Flattening(nn.Module):
    """Calls its layer on the batch flattened to [B*T, features], as some models do."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(6, 4)

    def forward(self, x):
        return self.layer(x.flatten(0, 1)).view(*x.shape[:2], -1)


def test_per_row_works_when_the_layer_sees_the_batch_flattened_and_refuses_other_layouts():
    torch.manual_seed(0)
    model = Flattening()
    for name in ("a", "b"):
        peftlite.inject(model, rank=2, name=name)
        nn.init.normal_(model.layer.lora_B[name])
    x = torch.randn(3, 5, 6)
    peftlite.set_adapter(model, "b")
    only_b = model(x)
    with peftlite.adapter_per_row(model, ["b", None, "b"]):
        mixed = model(x)
    torch.testing.assert_close(mixed[[0, 2]], only_b[[0, 2]], rtol=1e-5, atol=1e-6)
    with peftlite.disable_adapters(model):
        torch.testing.assert_close(mixed[1], model(x)[1])
    with peftlite.adapter_per_row(model, ["a", "b"]):
        with pytest.raises(PeftliteError, match="a per-row batch of 2 rows .*reached a layer whose input has shape"):
            model.layer(torch.randn(5, 6))


def test_per_row_through_a_llama_matches_each_adapter_alone_and_trains_the_named_ones():
    model = tiny_llama()
    for name, rank in (("a", 4), ("b", 2), ("c", 3)):
        peftlite.inject(model, rank=rank, name=name)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    ids = torch.randint(0, 64, (4, 9), generator=generator)  # 9 tokens per row: the gathered form
    names = ["b", None, "a", "b"]
    with peftlite.adapter_per_row(model, names):
        assert not model.model.layers[0].self_attn.q_proj.lora_A["c"].requires_grad
        mixed = model(ids).logits
    assert model.model.layers[0].self_attn.q_proj.lora_A["c"].requires_grad  # restored
    for row, name in enumerate(names):
        if name is None:
            with peftlite.disable_adapters(model):
                alone = model(ids[row:row + 1]).logits
        else:
            peftlite.set_adapter(model, name)
            alone = model(ids[row:row + 1]).logits
        torch.testing.assert_close(mixed[row:row + 1], alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tokens", [1, 2, 16])
def test_the_stacked_and_gathered_forms_agree_and_the_cache_follows_parameter_changes(tokens, monkeypatch):
    import peftlite.lora

    torch.manual_seed(0)
    host = Host(nn.Linear(10, 6))
    for name, rank in (("a", 3), ("b", 5)):
        peftlite.inject(host, rank=rank, name=name, targets=["layer"])
        nn.init.normal_(host.layer.lora_B[name])
    x = torch.randn(4, tokens, 10)
    results = {}
    for form, threshold in (("stacked", 10**9), ("gathered", 1)):
        monkeypatch.setattr(peftlite.lora, "GATHER_FROM", threshold)
        with peftlite.adapter_per_row(host, ["b", "a", None, "b"]), torch.no_grad():
            first = host(x)
            host.layer.lora_B["b"].mul_(2)  # an in-place change: the inference cache must not serve stale values
            results[form] = (first, host(x))
            host.layer.lora_B["b"].div_(2)
    for got, want in zip(results["gathered"], results["stacked"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(results["stacked"][0][0], results["stacked"][1][0])  # row 0 uses "b": it changed
    torch.testing.assert_close(results["stacked"][0][1], results["stacked"][1][1])  # row 1 uses "a": it did not


def test_per_row_refuses_prefixes_merged_layers_and_unknown_names():
    model = TinyMLP()
    peftlite.inject(model, rank=2, name="a")
    before = snapshot(model)
    for names, match in ((["a", "z"], "'z' is not an adapter"), ("a", "expected an adapter name or a non-empty"),
                         ([], "non-empty")):
        with pytest.raises(PeftliteError, match=match):
            peftlite.adapter_per_row(model, names if names != "a" else 5).__enter__()
        assert_unchanged(model, before)
    peftlite.merge(model)
    with pytest.raises(PeftliteError, match="holds merged"):
        peftlite.adapter_per_row(model, ["a"]).__enter__()


# ---- bottleneck adapters by name ----

def test_bottleneck_adapters_by_name_add_switch_and_mix_by_row():
    torch.manual_seed(0)
    model = TinyMLP()
    peftlite.inject(model, method="adapter", targets=["fc2"], name="a", bottleneck=3)
    peftlite.inject(model, method="adapter", targets=["fc2"], name="b", bottleneck=5, activation="gelu")
    for bottleneck in model.fc2.adapter.values():
        nn.init.normal_(bottleneck.up.weight)
    assert {"fc2.adapter.a.up.weight", "fc2.adapter.b.down.weight"} <= set(model.state_dict())
    x = torch.randn(4, 12)
    h = model.fc2.base(model.norm(torch.relu(model.fc1(x))))
    update = {n: model.fc2.adapter[n](h) for n in ("a", "b")}
    head = model.head

    def expected(*names):
        return head(torch.relu(h + sum(update[n] for n in names)))

    torch.testing.assert_close(model(x), expected("a", "b"))
    peftlite.set_adapter(model, "b")
    torch.testing.assert_close(model(x), expected("b"))
    with peftlite.adapter_per_row(model, ["a", None, "b", "a"]):
        mixed = model(x)
    torch.testing.assert_close(mixed[[0, 3]], expected("a")[[0, 3]])
    torch.testing.assert_close(mixed[1], head(torch.relu(h))[1])
    torch.testing.assert_close(mixed[2], expected("b")[2])
    with peftlite.disable_adapters(model):
        torch.testing.assert_close(model(x), head(torch.relu(h)))
