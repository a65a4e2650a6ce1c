"""Our safetensors writer produces files the safetensors library reads back bit for bit."""

import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from peftlite.io.safetensors_file import DTYPES, save_file


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_every_dtype_round_trips(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    source = (torch.randn(3, 5, generator=g) * 100).to(dtype)
    tensors = {"a.weight": source, "scalar": source[0, 0].clone(), "empty": source[:0], "t": source.t()}
    save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    loaded = load_file(tmp_path / "x.safetensors")
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == dtype and loaded[name].shape == tensor.shape
        assert torch.equal(loaded[name], tensor), name
    with safe_open(tmp_path / "x.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_header_is_aligned(tmp_path):
    save_file({"x": torch.ones(3)}, tmp_path / "x.safetensors")
    raw = (tmp_path / "x.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    assert length % 8 == 0 and len(raw) == 8 + length + 12
