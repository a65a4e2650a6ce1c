"""PrefixEncoder: layout (PEFT's), per-layer slices, eject equivalence, options."""

import pytest
import torch

from peftlite import PeftliteError, PrefixEncoder


def test_layout_matches_peft_prompt_embeddings():
    encoder = PrefixEncoder(num_layers=3, num_heads=2, head_dim=4, prefix_len=5)
    table = encoder.prefix.detach()  # [P, L * 2 * H * hd]
    # PEFT: view(P, L * 2, H, hd).permute(1, 2, 0, 3) -> [L * 2, H, P, hd]; layer l = rows 2l (keys), 2l + 1
    peft = table.view(5, 6, 2, 4).permute(1, 2, 0, 3)
    everything = encoder()
    assert everything.shape == (3, 2, 2, 5, 4)
    for layer in range(3):
        assert torch.equal(encoder(layer), everything[layer])
        assert torch.equal(encoder(layer)[0], peft[2 * layer]) and torch.equal(encoder(layer)[1], peft[2 * layer + 1])


def test_eject_keeps_outputs_and_leaves_one_table():
    torch.manual_seed(0)
    encoder = PrefixEncoder(num_layers=4, num_heads=3, head_dim=5, prefix_len=7, projection_dim=11)
    before = [encoder(layer).detach().clone() for layer in range(4)]
    assert {n for n, _ in encoder.named_parameters()} == {"embedding", "transform.0.weight", "transform.0.bias",
                                                          "transform.2.weight", "transform.2.bias"}
    encoder.eject()
    assert [n for n, _ in encoder.named_parameters()] == ["prefix"]
    for layer in range(4):
        torch.testing.assert_close(encoder(layer), before[layer], rtol=0, atol=1e-6)
    assert encoder.prefix.requires_grad and encoder.eject() is encoder


def test_projection_gradients_reach_the_mlp():
    encoder = PrefixEncoder(num_layers=2, num_heads=2, head_dim=3, prefix_len=4, projection_dim=6)
    encoder(1).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())


@pytest.mark.parametrize("kwargs, match", [
    ({"prefix_len": 0}, "prefix_len=0"), ({"num_heads": 0}, "num_heads=0"), ({"projection_dim": 0}, "projection_dim"),
    ({"head_dim": 2.5}, "head_dim=2.5"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(PeftliteError, match=match):
        PrefixEncoder(**{"num_layers": 2, "num_heads": 2, "head_dim": 4, **kwargs})


def test_layer_out_of_range():
    with pytest.raises(PeftliteError, match="layer=2: expected an integer from 0 to 1"):
        PrefixEncoder(2, 2, 4)(2)
