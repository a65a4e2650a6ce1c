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
import math
import os
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


def tensor_buffer(tensor: torch.Tensor):
    """The tensor's bytes as a buffer, without a copy where its memory already is little-endian CPU rows
    (a ctypes view that keeps ``tensor`` alive), else :func:`tensor_bytes`."""
    tensor = tensor.detach().to("cpu").contiguous()
    if sys.byteorder == "big" and tensor.element_size() > 1 or not tensor.numel():
        return tensor_bytes(tensor)
    view = (ctypes.c_char * (tensor.numel() * tensor.element_size())).from_address(tensor.data_ptr())
    view._owner = tensor  # the memory must outlive the view
    return view


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


# ---- one tensor at a time: checkpoints larger than memory ----

SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
         "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
TORCH = {code: dtype for dtype, code in DTYPES.items()}
MAX_HEADER = 100_000_000  # as safetensors itself


class Entry:
    """One tensor of a safetensors file: name, dtype code, shape, and where its bytes are."""

    def __init__(self, name: str, dtype: str, shape: list[int], begin: int, end: int):
        self.name, self.dtype, self.shape, self.begin, self.end = name, dtype, shape, begin, end

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def natural(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**64


def check_entry(name: str, info) -> None:
    """Raise ValueError unless ``info`` is a tensor entry that safetensors itself reads: a known dtype, a shape of
    non-negative integers whose running product fits 64 bits, two integer offsets."""
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise ValueError(f"tensor '{name}': entry {info!r} is not {{dtype, shape, data_offsets}}")
    shape, offsets = info["shape"], info["data_offsets"]
    if not isinstance(info["dtype"], str) or info["dtype"] not in SIZES:
        raise ValueError(f"tensor '{name}': unknown dtype {info['dtype']!r}")
    if not isinstance(shape, list) or not all(natural(d) for d in shape):
        raise ValueError(f"tensor '{name}': shape {shape!r} is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(natural(o) for o in offsets):
        raise ValueError(f"tensor '{name}': data_offsets {offsets!r} are not two non-negative integers")
    product = SIZES[info["dtype"]]
    for dim in shape:  # as safetensors checks: every partial product fits, even where a later dim is 0
        product *= dim
        if product >= 2**64:
            raise ValueError(f"tensor '{name}': shape {shape} overflows 64 bits")


def read_header(path: Path) -> tuple[list[Entry], dict, int]:
    """``(entries in file order, metadata, offset of the byte buffer)``; raises ValueError on a malformed file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError("shorter than the 8-byte header length")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(MAX_HEADER, size - 8):
            raise ValueError(f"header length {length} does not fit the file ({size} bytes)")
        header = json.loads(f.read(length))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"__metadata__ {metadata!r} is not a map of strings to strings")
    for name, info in header.items():
        check_entry(name, info)
    entries, start, expected = [], 8 + length, 0
    for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        count = math.prod(shape)
        if begin != expected or end - begin != count * SIZES[dtype]:
            raise ValueError(f"tensor '{name}': dtype {dtype}, shape {shape} and offsets {[begin, end]} disagree")
        entries.append(Entry(name, dtype, list(shape), begin, end))
        expected = end
    if start + expected != size:
        raise ValueError(f"the tensors end at byte {start + expected}, the file has {size}")
    return entries, metadata, start


def read_tensor(f, entry: Entry, start: int) -> torch.Tensor:
    """The tensor ``entry`` of the open file ``f`` (header ending at ``start``), read into its own memory."""
    f.seek(start + entry.begin)
    data = bytearray(entry.nbytes)
    if f.readinto(data) != entry.nbytes:
        raise ValueError(f"tensor '{entry.name}' is cut short")
    dtype = TORCH[entry.dtype]
    if not data:
        return torch.empty(entry.shape, dtype=dtype)
    tensor = torch.frombuffer(data, dtype=torch.uint8)
    if sys.byteorder == "big" and SIZES[entry.dtype] > 1:
        tensor = tensor.view(-1, SIZES[entry.dtype]).flip(1).contiguous().view(-1)
    return tensor.view(dtype).view(entry.shape)


class StreamWriter:
    """A safetensors file written tensor by tensor: the header (every name, dtype and shape) first, then each
    tensor's bytes in that order; only the tensor being written is ever in memory."""

    def __init__(self, path: Path, entries: list[tuple[str, str, list[int]]], metadata: dict | None = None):
        header, offset = {}, 0
        for name, dtype, shape in entries:
            count = math.prod(shape)
            end = offset + count * SIZES[dtype]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, end]}
            offset = end
        if metadata:
            header["__metadata__"] = metadata
        self.expected = [(name, header[name]["data_offsets"][1] - header[name]["data_offsets"][0])
                         for name, _, _ in entries]
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(encoded)))
        self.file.write(encoded)
        self.written = 0

    def write(self, name: str, data) -> None:
        """The next tensor's bytes (a tensor, or a bytes-like object already in the file's byte order)."""
        expected_name, size = self.expected[self.written]
        if isinstance(data, torch.Tensor):
            data = tensor_buffer(data)
        if name != expected_name or len(memoryview(data).cast("B")) != size:
            raise ValueError(f"expected {size} bytes of '{expected_name}', got '{name}'")
        self.file.write(data)
        self.written += 1

    def copy(self, name: str, f, offset: int, chunk: int = 1 << 26) -> None:
        """The next tensor's bytes copied from ``f`` at ``offset``, ``chunk`` bytes at a time (never decoded)."""
        expected_name, size = self.expected[self.written]
        if name != expected_name:
            raise ValueError(f"expected '{expected_name}', got '{name}'")
        f.seek(offset)
        left = size
        while left:
            data = f.read(min(chunk, left))
            if not data:
                raise ValueError(f"tensor '{name}' is cut short")
            self.file.write(data)
            left -= len(data)
        self.written += 1

    def close(self) -> None:
        if self.written != len(self.expected):
            raise ValueError(f"{len(self.expected) - self.written} tensors were not written")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
