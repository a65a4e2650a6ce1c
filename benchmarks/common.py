"""Shared benchmark plumbing: interleaved timing, saved-activation bytes, run metadata, JSON output."""

import copy
import datetime
import json
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path

import torch


def device_name(device: str = "cpu") -> str:
    """The GPU's name for a CUDA run, else the CPU's model name."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def metadata(device: str = "cpu", **extra) -> dict:
    """What every result records: the device the run used (and a GPU's architecture), threads, versions, commit
    and date, plus ``extra``."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    versions = {"torch": torch.__version__}
    for name in ("peft", "triton", "transformers", "trl"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    arch = {}
    if torch.device(device).type == "cuda":
        arch = {"arch": "sm_{}{}".format(*torch.cuda.get_device_capability(device))}
    return {"device": device_name(device), **arch, "threads": torch.get_num_threads(), "versions": versions,
            "commit": commit, "date": datetime.date.today().isoformat(), **extra}


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved(contenders: dict, rounds: int, warmup: int, inner: int = 1) -> dict[str, list[float]]:
    """Seconds per call for each contender, timed A B C A B C ... so drift hits all alike.

    A contender that returns a number has timed itself (e.g. only its backward): that is used.
    The GPU is synchronized around each timed stretch.
    """
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    times = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            synchronize()
            start, own = time.perf_counter(), 0.0
            for _ in range(inner):
                result = fn()
                own += result if isinstance(result, float) else 0.0
            synchronize()
            elapsed = own if own else time.perf_counter() - start
            times[name].append(elapsed / inner)
    return times


def summarize(times: dict[str, list[float]], baseline: str, rival: str | None = None) -> dict[str, dict]:
    """Median time, median of per-round ratios against ``baseline``, and ``rival``'s time over each contender's."""
    def ratio(a, b):
        return statistics.median(x / y for x, y in zip(a, b))
    out = {}
    for name, t in times.items():
        out[name] = {"median_ms": 1e3 * statistics.median(t), "ratio_vs_base": ratio(t, times[baseline])}
        if rival in times:
            out[name][f"{rival}_time_over_this"] = ratio(times[rival], t)
    return out


def saved_activation_bytes(fn) -> int:
    """Bytes of tensors autograd saves for backward during ``fn()`` (parameters included once each)."""
    seen, total = set(), 0

    def pack(tensor):
        nonlocal total
        key = (tensor.untyped_storage().data_ptr(), tensor.dtype, tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def write_results(name: str, meta: dict, rows: list, out: Path | None = None) -> Path:
    """Write ``{"meta", "rows"}`` to ``out`` or ``results/<name>-<device>.json``; return the path."""
    slug = re.sub(r"[^a-z0-9]+", "-", f"{name}-{meta['device']}".lower()).strip("-")
    path = out or Path(__file__).resolve().parent / "results" / f"{slug}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def add_run_options(parser, rounds: int, warmup: int) -> None:
    """The options every timed benchmark takes: dtype, device, threads, rounds, warm-up rounds, output path."""
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--out", type=Path, default=None)


def mib(*keys: str):
    """A column getter: the first of ``keys`` the row has, bytes shown in MiB (None if it has none)."""
    def get(row):
        found = next((row[key] for key in keys if row.get(key) is not None), None)
        return None if found is None else found / 2**20
    return get


def print_table(rows: list[dict], columns: list[tuple]) -> None:
    """One line per row. ``columns``: (title, format spec with alignment and width such as ``">10.3f"``,
    the row's key or a function of the row); a missing value prints as blanks."""
    cells = [(title, spec, re.match(r"([<>^])(\d+)", spec), get) for title, spec, get in columns]
    print(" ".join(f"{title:{place[1]}{place[2]}}" for title, _, place, _ in cells))
    for row in rows:
        values = ((get(row) if callable(get) else row.get(get), spec, place) for _, spec, place, get in cells)
        print(" ".join(" " * int(place[2]) if value is None else f"{value:{spec}}" for value, spec, place in values))


def run_and_report(args, run, columns: list[tuple], name: str, benchmark: str) -> None:
    """Fix and print the thread count, run, print the table (``columns``: see print_table), write the JSON."""
    torch.set_num_threads(args.threads)
    print(f"threads: {torch.get_num_threads()}  device: {device_name(args.device)}")
    rows = run(args)
    print_table(rows, columns)
    meta = metadata(args.device, benchmark=benchmark, rounds=args.rounds, warmup=args.warmup)
    write_results(name, meta, rows, args.out)


def peft_twin(base: torch.nn.Linear, ours, rank: int, dropout: float = 0.0):
    """HF PEFT's LoRA Linear around a copy of ``base``, with the same alpha, dropout and adapter values."""
    from peft import LoraConfig, inject_adapter_in_model

    holder = torch.nn.Sequential(copy.deepcopy(base))
    config = LoraConfig(r=rank, lora_alpha=ours.lora_settings["default"].alpha, lora_dropout=dropout, target_modules=["0"])
    inject_adapter_in_model(config, holder)
    layer = holder[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(ours.lora_A["default"])
        layer.lora_B["default"].weight.copy_(ours.lora_B["default"])
    return layer
