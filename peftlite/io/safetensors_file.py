"""Writing the safetensors format with torch alone.

``safetensors.torch.save_file`` needs NumPy to reach tensor memory; peftlite's runtime dependencies
are torch, einops and safetensors only, so adapters are written here, to the published format:

    [8 bytes: header length N, little-endian u64][N bytes: JSON header, space-padded][raw tensor bytes]

The header maps each name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets into the
byte buffer, in order, without gaps) plus ``"__metadata__"``: a string-to-string map. Tensor bytes
are little-endian. Files are read back with ``safetensors.torch.load_file``, which validates them.
"""

import ctypes
import json
import struct
import sys
from pathlib import Path

import torch

DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The tensor's elements as little-endian bytes, in row-major order."""
    tensor = tensor.detach().to("cpu").contiguous()
    if sys.byteorder == "big" and tensor.element_size() > 1:
        tensor = tensor.view(torch.uint8).view(-1, tensor.element_size()).flip(1).contiguous()
    return ctypes.string_at(tensor.data_ptr(), tensor.numel() * tensor.element_size()) if tensor.numel() else b""


def save_file(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` to ``path`` as a safetensors file."""
    header, chunks, offset = {}, [], 0
    for name, tensor in tensors.items():
        data = tensor_bytes(tensor)
        header[name] = {"dtype": DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = metadata
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the byte buffer starts 8-byte aligned
    with open(Path(path), "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for data in chunks:
            f.write(data)
