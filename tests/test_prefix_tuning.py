"""Prefix tuning through inject(method="prefix"): references, masks, causality, GQA, checkpointing, detector."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import peftlite
from peftlite import PeftliteError
from tests.models import assert_unchanged, snapshot, tiny_bert, tiny_llama


def gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def mha_reference(mha: nn.MultiheadAttention, x, prefix, key_padding_mask=None, causal=False):
    """Attention over [prefix inputs ; x] written out in float64. x: (B, L, E); prefix: (2, P, E)."""
    w, b = mha.in_proj_weight.double(), mha.in_proj_bias.double()
    heads, (batch, length, embed), count = mha.num_heads, x.shape, prefix.shape[1]
    x = x.double()
    q = x @ w[:embed].T + b[:embed]
    k = torch.cat([prefix[0].double().expand(batch, -1, -1), x], 1) @ w[embed:2 * embed].T + b[embed:2 * embed]
    v = torch.cat([prefix[1].double().expand(batch, -1, -1), x], 1) @ w[2 * embed:].T + b[2 * embed:]
    split = lambda t: t.view(batch, t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731  (B, H, L, hd)
    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(embed // heads)  # (B, H, L, P + L)
    allowed = torch.ones(batch, 1, length, count + length, dtype=torch.bool)
    if key_padding_mask is not None:
        allowed[:, :, :, count:] &= ~key_padding_mask[:, None, None, :]
    if causal:
        allowed[:, :, :, count:] &= torch.ones(length, length, dtype=torch.bool).tril()
    out = (scores.masked_fill(~allowed, -math.inf).softmax(-1) @ split(v)).transpose(1, 2).reshape(batch, length, -1)
    return out @ mha.out_proj.weight.double().T + mha.out_proj.bias.double()


def mha_prefix(model):
    keys, values = model.prefix_encoder["default"](0).permute(0, 2, 1, 3).flatten(2).detach()
    return torch.stack([keys, values])


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_matches_float64_reference(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).double()
    holder = nn.ModuleList([mha])  # inject adapts modules inside a model
    peftlite.inject(holder, method="prefix", prefix_len=3)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    causal = nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64)
    inputs = x if batch_first else x.transpose(0, 1)
    out, _ = mha(inputs, inputs, inputs, key_padding_mask=padding, attn_mask=causal)
    out = out if batch_first else out.transpose(0, 1)
    expected = mha_reference(mha, x, mha_prefix(holder), padding, causal=True)
    torch.testing.assert_close(out, expected)
    out, _ = mha(inputs, inputs, inputs, attn_mask=causal.isinf(), is_causal=True, need_weights=False)
    out = out if batch_first else out.transpose(0, 1)
    torch.testing.assert_close(out, mha_reference(mha, x, mha_prefix(holder), causal=True))


def test_encoder_fast_paths_do_not_skip_the_prefix():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True, dropout=0.0)
    encoder = nn.TransformerEncoder(layer, num_layers=2).eval()  # eval + no_grad + padding: nested + fused paths
    x = torch.randn(2, 6, 16)
    padding = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    with torch.no_grad():
        base = encoder(x, src_key_padding_mask=padding)
    peftlite.inject(encoder, method="prefix", prefix_len=4)
    assert len(encoder.prefix_encoder["default"].targets) == 2
    with torch.no_grad():
        fast = encoder(x, src_key_padding_mask=padding)
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            slow = encoder(x, src_key_padding_mask=padding)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    assert not torch.allclose(fast[0], base[0])
    torch.testing.assert_close(fast[:, :4], slow[:, :4])
    peftlite.unload(encoder)
    assert encoder.use_nested_tensor
    with torch.no_grad():
        torch.testing.assert_close(encoder(x, src_key_padding_mask=padding)[0], base[0])


class CausalAttention(nn.Module):
    """A custom attention module following peftlite.prefix.attention.PrefixAttention (grouped-query)."""

    def __init__(self, dim=24, heads=6, kv_heads=2):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):  # (B, L, dim)
        batch, length, _ = x.shape
        q = self.q(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(batch, length, 2, self.num_kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        groups = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)  # (B, H, L, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(batch, length, -1))


class Tiny(nn.Module):
    def __init__(self, attention=CausalAttention):
        super().__init__()
        self.blocks = nn.ModuleList([attention() for _ in range(2)])

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


def custom_reference(module: CausalAttention, x, prefix):
    """Causal grouped-query attention over [prefix ; keys] in float64; prefix: (2, H_kv, P, hd)."""
    batch, length, _ = x.shape
    x = x.double()
    lin = lambda layer, t: t @ layer.weight.double().T + layer.bias.double()  # noqa: E731
    q = lin(module.q, x).view(batch, length, module.num_heads, -1).transpose(1, 2)
    k, v = lin(module.kv, x).view(batch, length, 2, module.num_kv_heads, -1).permute(2, 0, 3, 1, 4)
    groups = module.num_heads // module.num_kv_heads
    pk, pv = (p.double().repeat_interleave(groups, 0).expand(batch, -1, -1, -1) for p in prefix)
    k = torch.cat([pk, k.repeat_interleave(groups, 1)], 2)
    v = torch.cat([pv, v.repeat_interleave(groups, 1)], 2)
    count = prefix.shape[2]
    allowed = torch.cat([torch.ones(length, count, dtype=torch.bool), torch.ones(length, length).tril().bool()], 1)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(module.head_dim)).masked_fill(~allowed, -math.inf)
    return lin(module.out, (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, -1))


def test_custom_protocol_module_matches_reference_and_stays_causal():
    torch.manual_seed(0)
    model = Tiny().double()
    peftlite.inject(model, method="prefix", prefix_len=5, projection_dim=7)
    assert model.prefix_encoder["default"](0).shape == (2, 2, 5, 4)  # key/value heads, not query heads
    x = torch.randn(3, 6, 24, dtype=torch.float64)
    block = model.blocks[0]
    torch.testing.assert_close(block(x), custom_reference(block, x, model.prefix_encoder["default"](0).detach()))
    out = model(x)
    later = x.clone()
    later[:, 4:] += torch.randn(3, 2, 24, dtype=torch.float64)
    changed = model(later)
    torch.testing.assert_close(changed[:, :4], out[:, :4], rtol=0, atol=0)  # earlier outputs untouched
    assert not torch.allclose(changed[:, 4:], out[:, 4:])


def test_detector_raises_when_attention_bypasses_sdpa():
    class Manual(CausalAttention):
        def forward(self, x):  # computes attention by hand: the prefix cannot reach it
            q = self.q(x)
            return self.out(torch.softmax(q @ q.transpose(-1, -2), -1) @ q)

    model = Tiny(Manual)
    peftlite.inject(model, method="prefix", prefix_len=2)
    with pytest.raises(PeftliteError, match="ran scaled-dot-product attention 0 times"):
        model(torch.randn(1, 3, 24))
    eager = tiny_llama(attn_implementation="eager")
    peftlite.inject(eager, method="prefix", prefix_len=2)
    with pytest.raises(PeftliteError, match="attn_implementation='sdpa'"):
        eager(input_ids=torch.randint(0, 64, (1, 4)))
    # the detector left nothing active: an error did not strand the interception mode
    assert torch.equal(F.scaled_dot_product_attention(*(torch.ones(1, 1, 2, 2),) * 3), torch.ones(1, 1, 2, 2))


def test_hugging_face_models_run_the_registered_attention_and_get_it_back():
    from peftlite.prefix.hf_attention import NAME

    model = tiny_llama()
    ids = torch.randint(0, 64, (1, 5))
    base = model(input_ids=ids).logits
    peftlite.inject(model, method="prefix", prefix_len=2)
    assert model.config._attn_implementation == NAME
    assert model(input_ids=ids).logits.shape == base.shape
    model.set_attn_implementation("eager")  # switched behind peftlite's back: the prefix would be skipped
    with pytest.raises(PeftliteError, match="ran scaled-dot-product attention 0 times"):
        model(input_ids=ids)
    model.set_attn_implementation(NAME)
    peftlite.unload(model)
    assert model.config._attn_implementation == "sdpa"
    assert not any("_peftlite_prefix_hook" in m.__dict__ for m in model.modules())
    torch.testing.assert_close(model(input_ids=ids).logits, base, rtol=0, atol=0)


def test_llama_prefix_is_causal_and_seen_by_every_query():
    model = tiny_llama()
    ids = torch.randint(0, 64, (2, 9))
    base = model(input_ids=ids).logits
    peftlite.inject(model, method="prefix", prefix_len=4)
    out = model(input_ids=ids).logits
    assert (out - base)[:, 0].abs().amax() > 1e-3  # even the first token sees the prefix
    later = ids.clone()
    later[:, 6:] = (later[:, 6:] + 1) % 64
    torch.testing.assert_close(model(input_ids=later).logits[:, :6], out[:, :6], rtol=0, atol=0)


@pytest.mark.parametrize("build", [tiny_llama, gpt2])
def test_sample_alone_equals_sample_in_padded_batch(build):
    model = build()
    peftlite.inject(model, method="prefix", prefix_len=3)
    torch.manual_seed(1)
    short, long = torch.randint(1, 64, (1, 5)), torch.randint(1, 64, (1, 8))
    alone = model(input_ids=short).logits
    right = torch.cat([torch.cat([short, torch.zeros(1, 3, dtype=torch.long)], 1), long])
    mask = torch.cat([torch.cat([torch.ones(1, 5), torch.zeros(1, 3)], 1), torch.ones(1, 8)]).long()
    torch.testing.assert_close(model(input_ids=right, attention_mask=mask).logits[:1, :5], alone)
    left = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    left_mask = mask.flip(1)[[0]].expand(1, -1)
    left_mask = torch.cat([left_mask, torch.ones(1, 8, dtype=torch.long)])
    positions = (left_mask.cumsum(1) - 1).clamp(min=0)
    batched = model(input_ids=left, attention_mask=left_mask, position_ids=positions).logits
    torch.testing.assert_close(batched[:1, 3:], alone)
    torch.testing.assert_close(batched[1:], model(input_ids=long).logits)


def test_bert_padding_and_only_prefix_trains():
    assert [n for n, p in peftlite.inject(tiny_bert(), method="prefix", prefix_len=3).named_parameters()
            if p.requires_grad] == ["classifier.weight", "classifier.bias",
                                  "prefix_encoder.default.prefix"]  # the new head trains
    model = tiny_bert()
    peftlite.inject(model, method="prefix", prefix_len=3, trainable=[])
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prefix_encoder.default.prefix"]
    torch.manual_seed(2)
    short = torch.randint(1, 64, (1, 5))
    padded = torch.cat([short, torch.zeros(1, 2, dtype=torch.long)], 1)
    mask = torch.tensor([[1] * 5 + [0] * 2])
    torch.testing.assert_close(model(input_ids=padded, attention_mask=mask).logits, model(input_ids=short).logits)


def llama_grads(model, ids, checkpointing=None):
    model.train()
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
        model.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return model.prefix_encoder["default"].transform[0].weight.grad.clone(), model.prefix_encoder["default"].embedding.grad.clone()


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    ids = torch.randint(0, 64, (2, 7))
    grads = []
    for checkpointing in (None, reentrant):
        model = tiny_llama()
        torch.manual_seed(5)
        peftlite.inject(model, method="prefix", prefix_len=3, projection_dim=8)
        grads.append(llama_grads(model, ids, checkpointing))
    for plain, checkpointed in zip(*grads):
        assert plain.abs().sum() > 0
        torch.testing.assert_close(checkpointed, plain)


def test_custom_module_under_torch_checkpoint():
    torch.manual_seed(0)
    model = Tiny()
    peftlite.inject(model, method="prefix", prefix_len=3)
    x = torch.randn(2, 5, 24)
    model(x).sum().backward()
    plain = model.prefix_encoder["default"].prefix.grad.clone()
    model.zero_grad()
    y = x
    for block in model.blocks:
        y = y + checkpoint(block, y, use_reentrant=False)
    y.sum().backward()
    torch.testing.assert_close(model.prefix_encoder["default"].prefix.grad, plain)


def test_no_stale_prefix_after_training_steps_and_mode_switches():
    model = tiny_llama()
    peftlite.inject(model, method="prefix", prefix_len=3, projection_dim=8)
    ids = torch.randint(0, 64, (2, 6))
    optimizer = torch.optim.SGD(model.prefix_encoder["default"].parameters(), lr=1.0)
    model.eval()
    with torch.no_grad():
        first = model(input_ids=ids).logits
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        second = model(input_ids=ids).logits
    assert not torch.allclose(first, second)  # the update shows at once, in eval and without grad
    fresh = tiny_llama()
    peftlite.inject(fresh, method="prefix", prefix_len=3, projection_dim=8)
    fresh.prefix_encoder["default"].load_state_dict(model.prefix_encoder["default"].state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, second)


def test_unload_removes_prefix_and_hooks():
    model = tiny_llama()
    ids = torch.randint(0, 64, (1, 5))
    base = model(input_ids=ids).logits
    before = snapshot(model)
    peftlite.inject(model, method="prefix", prefix_len=3)
    with pytest.raises(PeftliteError, match="cannot be merged"):
        peftlite.merge(model)
    peftlite.unload(model)
    model.requires_grad_(True)
    assert_unchanged(model, before)
    torch.testing.assert_close(model(input_ids=ids).logits, base, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs, match", [
    ({"prefix_len": 0}, "prefix_len=0"),
    ({"targets": ["mlp"]}, "not an attention module"),
    ({"targets": ["self_atn"]}, "matched no module"),
    ({"projection_dim": -1}, "projection_dim=-1"),
    ({"rank": 4}, "applies to method='lora' only"),
])
def test_bad_inputs_raise_and_leave_model_unchanged(kwargs, match):
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(PeftliteError, match=match):
        peftlite.inject(model, method="prefix", **kwargs)
    assert_unchanged(model, before)


def test_sequential_root_is_refused_unchanged():
    model = nn.Sequential(CausalAttention(), CausalAttention())
    before = snapshot(model)
    with pytest.raises(PeftliteError, match="nn.Sequential"):
        peftlite.inject(model, method="prefix")
    assert_unchanged(model, before)


def test_second_prefix_is_refused_unchanged():
    model = tiny_llama()
    peftlite.inject(model, method="prefix", prefix_len=2)
    before = snapshot(model)
    with pytest.raises(PeftliteError, match="already has a prefix"):
        peftlite.inject(model, method="prefix", prefix_len=2)
    assert_unchanged(model, before)


def test_generate_with_kv_cache_matches_uncached_greedy_decoding():
    model = tiny_llama()
    peftlite.inject(model, method="prefix", prefix_len=3)
    ids = torch.randint(1, 64, (1, 5))
    cached = model.generate(ids, max_new_tokens=6, do_sample=False)  # positions come from the cache here
    sequence = ids
    for _ in range(6):
        token = model(input_ids=sequence).logits[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, token], 1)
    assert torch.equal(cached, sequence)


def test_deepcopy_gets_its_own_prefix_and_adapters():
    import copy

    model = tiny_llama()
    peftlite.inject(model, method="adapter", targets=["o_proj"], bottleneck=4)
    peftlite.inject(model, method="prefix", prefix_len=3)
    ids = torch.randint(0, 64, (1, 5))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        torch.testing.assert_close(twin(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
        expected = model(input_ids=ids).logits
        twin.prefix_encoder["default"].prefix.zero_()
        twin.model.layers[0].self_attn.o_proj.bottleneck.up.weight.fill_(1.0)
        assert not torch.allclose(twin(input_ids=ids).logits, expected)
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=0, atol=0)  # the original is its own


def test_interception_path_matches_the_registry_path_on_llama(monkeypatch):
    """Transformers without an attention registry fall back to intercepting the SDPA call: same logits."""
    from peftlite.prefix import hf_attention

    ids = torch.randint(0, 64, (2, 7))
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    registry = tiny_llama()
    peftlite.inject(registry, method="prefix", prefix_len=3)
    monkeypatch.setattr(hf_attention, "switch", lambda model: [])
    intercepted = tiny_llama()
    peftlite.inject(intercepted, method="prefix", prefix_len=3)
    assert intercepted.config._attn_implementation == "sdpa"
    intercepted.prefix_encoder["default"].load_state_dict(registry.prefix_encoder["default"].state_dict())
    for kwargs in ({}, {"attention_mask": mask}):
        expected = registry(input_ids=ids, **kwargs).logits
        torch.testing.assert_close(intercepted(input_ids=ids, **kwargs).logits, expected, rtol=1e-6, atol=1e-6)
