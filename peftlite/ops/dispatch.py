"""Which backend runs a CUDA layer when ``PEFTLITE_BACKEND`` is unset: the measured winner, as data.

``dispatch.json`` (beside this file) lists layer shapes timed on GPUs by ``benchmarks/bench_lora_layer.py``
and the backend that was faster on each, per GPU architecture (``sm_90``: H100 and H200), dtype and
mode (``train``: forward+backward, with dropout on or off; ``infer``: a forward without gradients,
decoding included). ``benchmarks/dispatch_table.py`` writes it from the benchmark's JSON. A call runs
the backend of the nearest measured shape of its group,

    distance = |log2 M - log2 M'| + |log2 K - log2 K'| + |log2 N - log2 N'| + |log2 r - log2 r'|

(under ``torch.compile`` without the M term: the rows may be symbolic there, and the choice is made
once while tracing and kept in the graph as a constant). A group with no entry
(a GPU architecture nobody measured), CPU tensors, a missing ``triton`` package and shapes past the
kernels' int32 offsets all run ``torch``: the Triton kernels run by default only where they were
measured to win.
"""

import functools
import importlib.util
import json
import math
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from ..errors import PeftliteError
from .autograd import needs_gradient

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


def measured_backend(arch: str, dtype: str, mode: str, dropout: bool, m: Optional[int], k: int, n: int,
                     rank: int) -> str:
    """The backend measured faster at the nearest shape of the group, or ``torch`` for an empty group."""
    group = table().get((arch, dtype, mode, dropout))
    if not group:
        return "torch"
    return min(group, key=lambda entry: distance(entry, m, k, n, rank)).backend


def oversized(m: int, k: int, n: int) -> Optional[tuple[str, int]]:
    """``(name, elements)`` of the first of x [M, K], y [M, N], W [N, K] too large for the Triton kernels'
    int32 offsets, or None when all fit."""
    sizes = (("x [M, K]", m * k), ("y [M, N]", m * n), ("W [N, K]", n * k))
    return next(((name, elements) for name, elements in sizes if elements >= MAX_OFFSET), None)


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def rows_bucket(m: int) -> int:
    """M rounded up to a power of two: the table is looked up in log2, and the cache stays small."""
    return 1 << max(m - 1, 0).bit_length()


@functools.lru_cache(maxsize=4096)
def decide(device_type: str, device_index: Optional[int], dtype: str, training: bool, dropout: bool,
           rows: Optional[int], k: int, n: int, rank: int) -> str:
    """The automatic choice from plain values: ``rows`` is M as a power of two, or None (left out)."""
    if device_type != "cuda" or 0 in (k, n, rank) or rows == 0 or not triton_available():
        return "torch"
    major, minor = torch.cuda.get_device_capability(device_index)
    return measured_backend(f"sm_{major}{minor}", dtype, "train" if training else "infer", dropout and training,
                            rows, k, n, rank)


@torch.compiler.assume_constant_result
def decide_while_compiling(device_type: str, device_index: Optional[int], dtype: str, training: bool,
                           dropout: bool, k: int, n: int, rank: int) -> str:
    """:func:`decide` without the rows, run once while ``torch.compile`` traces (its result is a constant
    of the graph: no file read, cache or device query is traced, no guard or recompile on the rows)."""
    return decide(device_type, device_index, dtype, training, dropout, None, k, n, rank)


def choose(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
           lora_B: torch.Tensor, dropout: float) -> str:
    """``torch`` or ``triton`` for a call with input ``x`` [..., K] (see the module docstring)."""
    compiling = torch.compiler.is_compiling()
    if x.device.type != "cuda" and not compiling:  # eager CPU calls: nothing to look up
        return "torch"
    (n, k), rank = weight.shape, lora_A.shape[0]
    where, dtype = (x.device.type, x.device.index), str(x.dtype).removeprefix("torch.")
    training = needs_gradient(x, weight, bias, lora_A, lora_B)
    dropout_on = True if dropout else False  # a branch, so a symbolic float under torch.compile becomes a guard
    if compiling:
        return decide_while_compiling(*where, dtype, training, dropout_on, k, n, rank)
    m = x.numel() // k if k else 0
    if oversized(m, k, n):
        return "torch"
    return decide(*where, dtype, training, dropout_on, rows_bucket(m) if m else 0, k, n, rank)
