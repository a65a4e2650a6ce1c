"""Which backend runs a CUDA layer when ``PEFTLITE_BACKEND`` is unset: the measured winner, as data.

``dispatch.json`` (beside this file) lists layer shapes timed on GPUs by ``benchmarks/bench_lora_layer.py``
and the backend that was faster on each, per GPU architecture (``sm_90``: H100 and H200), dtype and
mode (``train``: forward+backward, with dropout on or off; ``infer``: a forward without gradients,
decoding included). ``benchmarks/dispatch_table.py`` writes it from the benchmark's JSON. A call runs
the backend of the nearest measured shape of its group,

    distance = |log2 M - log2 M'| + |log2 K - log2 K'| + |log2 N - log2 N'| + |log2 r - log2 r'|

(under ``torch.compile`` without the M term: the rows may be symbolic there). A group with no entry
(a GPU architecture nobody measured), CPU tensors, a missing ``triton`` package and shapes past the
kernels' int32 offsets all run ``torch``: the Triton kernels run by default only where they were
measured to win.
"""

import functools
import json
import math
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from ..errors import PeftliteError

TABLE = Path(__file__).with_name("dispatch.json")
MAX_OFFSET = 2**31  # the Triton kernels' offsets and dropout counters are int32: M*K, M*N and N*K stay below


class Entry(NamedTuple):
    """One measured shape: its group (arch, dtype, mode, dropout), its size and the faster backend."""

    arch: str
    dtype: str
    mode: str
    dropout: bool
    m: int
    k: int
    n: int
    rank: int
    backend: str


def read_table(path: Path = TABLE) -> dict[tuple, list[Entry]]:
    """The table's entries grouped by ``(arch, dtype, mode, dropout)``."""
    groups = {}
    for row in json.loads(path.read_text())["entries"]:
        entry = parse_entry(row, path)
        groups.setdefault(entry[:4], []).append(entry)
    return groups


def parse_entry(row: dict, path: Path) -> Entry:
    missing = [name for name in Entry._fields if name not in row]
    if missing or row["mode"] not in ("train", "infer") or row["backend"] not in ("torch", "triton"):
        raise PeftliteError(
            f"{path}: dispatch entry {row} is malformed (missing {missing}; mode must be 'train' or 'infer', "
            "backend 'torch' or 'triton'). Rewrite the table with benchmarks/dispatch_table.py, or set "
            "PEFTLITE_BACKEND to skip it.")
    return Entry(**{name: row[name] for name in Entry._fields})


@functools.cache
def table() -> dict[tuple, list[Entry]]:
    return read_table()


def distance(entry: Entry, m: Optional[int], k: int, n: int, rank: int) -> float:
    """Sum of |log2| differences between a call's shape and a measured one (M left out when ``m`` is None)."""
    pairs = [(k, entry.k), (n, entry.n), (rank, entry.rank)] + ([] if m is None else [(m, entry.m)])
    return sum(abs(math.log2(a) - math.log2(b)) for a, b in pairs)


@functools.lru_cache(maxsize=4096)
def measured_backend(arch: str, dtype: str, mode: str, dropout: bool, m: Optional[int], k: int, n: int,
                     rank: int) -> str:
    """The backend measured faster at the nearest shape of the group, or ``torch`` for an empty group."""
    group = table().get((arch, dtype, mode, dropout))
    if not group:
        return "torch"
    return min(group, key=lambda entry: distance(entry, m, k, n, rank)).backend


def fits_int32(m: int, k: int, n: int) -> bool:
    """Whether x [M, K], y [M, N] and W [N, K] are small enough for the Triton kernels' int32 offsets."""
    return max(m * k, m * n, n * k) < MAX_OFFSET


def architecture(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def rows_bucket(m: int) -> int:
    """M rounded up to a power of two: the table is looked up in log2, and the cache stays small."""
    return 1 << max(m - 1, 0).bit_length()


def choose(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, dropout: float, training: bool) -> str:
    """``torch`` or ``triton`` for a call with input ``x`` [..., K] (see the module docstring)."""
    (n, k), rank = weight.shape, lora_A.shape[0]
    if x.device.type != "cuda" or 0 in (n, k, rank):
        return "torch"
    m = None  # under torch.compile the rows may be symbolic: no guard on them, no recompile per bucket
    if not torch.compiler.is_compiling():
        m = x.numel() // k
        if m == 0 or not fits_int32(m, k, n):
            return "torch"
        m = rows_bucket(m)
    mode = "train" if training else "infer"
    return measured_backend(architecture(x.device), str(x.dtype).removeprefix("torch."), mode,
                            bool(dropout) and training, m, k, n, rank)
