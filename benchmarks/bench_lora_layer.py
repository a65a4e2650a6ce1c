"""One LoRA layer: frozen base nn.Linear vs each peftlite path vs HF PEFT's LoRA, side by side.

Modes: forward (training, gradients on), backward alone, forward+backward, inference forward
(unmerged, merged) and decode (inference on 1 and 16 rows). Contenders: the frozen base,
peftlite's ``torch`` path, its ``reference`` twin, its ``triton`` kernels (CUDA only), and PEFT.
Reports medians, the median of per-round ratios against the frozen base and PEFT's time over
each contender's, the FLOP floor, saved-activation bytes and (GPU) peak memory. Inputs rotate
among several random sets so caches do not flatter small shapes. Writes
benchmarks/results/<device>.json.

    python benchmarks/bench_lora_layer.py                    # CPU: M=2048, 1024 -> 1024, r=16, fp32
    python benchmarks/bench_lora_layer.py --device cuda --m 8192 --k 4096 --n 4096 --ranks 16 64 --dtype bfloat16
"""

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import peftlite  # noqa: E402
from peftlite.ops.backend import triton_available  # noqa: E402


class OnBackend(nn.Module):
    """Runs ``layer`` with PEFTLITE_BACKEND set to ``backend`` (read at each call)."""

    def __init__(self, layer: nn.Module, backend: str):
        super().__init__()
        self.layer, self.backend = layer, backend

    def forward(self, x):
        os.environ["PEFTLITE_BACKEND"] = self.backend
        return self.layer(x)


def make_layers(args, rank, dropout) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    base = nn.Linear(args.k, args.n).to(args.device, dtype).requires_grad_(False)
    ours = peftlite.LoRALinear(copy.deepcopy(base), rank, alpha=2 * rank, dropout=dropout)
    with torch.no_grad():
        ours.lora_B["default"].normal_(0, 0.02)  # trained-looking, nonzero
    backends = ["torch", "reference"] + (["triton"] if args.device == "cuda" and triton_available() else [])
    layers = {"base": base, **{f"peftlite {b}": OnBackend(ours, b) for b in backends}}
    try:
        layers["peft"] = common.peft_twin(base, ours, rank, dropout)
    except ImportError:
        print("peft is not installed: PEFT rows skipped (pip install peft)")
    return layers


def inputs(args, rows, count=4, grad=True):
    dtype = getattr(torch, args.dtype)
    xs = [torch.randn(rows, args.k, device=args.device, dtype=dtype).requires_grad_(grad) for _ in range(count)]
    gs = [torch.randn(rows, args.n, device=args.device, dtype=dtype) for _ in range(count)]
    return xs, gs


def rotating(fn, xs, gs):
    state = {"i": 0}

    def step():
        state["i"] = (state["i"] + 1) % len(xs)
        return fn(xs[state["i"]], gs[state["i"]])
    return step


def clear(layer, x):
    x.grad = None
    for p in layer.parameters():
        p.grad = None


def steps(layer, mode):
    def forward(x, g):
        layer(x)

    def backward(x, g):
        y = layer(x)
        common.synchronize()
        start = time.perf_counter()
        y.backward(g)
        common.synchronize()
        clear(layer, x)
        return time.perf_counter() - start

    def both(x, g):
        layer(x).backward(g)
        clear(layer, x)

    def infer(x, g):
        with torch.no_grad():
            layer(x)
    return {"forward": forward, "backward": backward, "forward+backward": both, "inference": infer}[mode]


def flop_floor_ratio(m, k, n, rank) -> float:
    """(base + LoRA FLOPs) / base FLOPs for forward+backward: the ratio if the extra work ran at base speed."""
    base = 4 * m * n * k  # forward x W^T, backward dx = g W (no dW: frozen)
    lora = 6 * m * rank * (k + n)  # forward 2Mr(K+N), backward dt, dB, dA, dx-term
    return (base + lora) / base


def memory(layer, x, g) -> dict:
    out = {"saved_bytes": common.saved_activation_bytes(lambda: layer(x))}
    if torch.cuda.is_available() and x.is_cuda:
        clear(layer, x)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        layer(x).backward(g)
        torch.cuda.synchronize()
        out["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - start
        clear(layer, x)
    return out


def measure(layers, mode, xs, gs, args, extra) -> list[dict]:
    for layer in layers.values():
        layer.train(mode != "inference")
    timed = {name: rotating(steps(layer, mode), xs, gs) for name, layer in layers.items()}
    summary = common.summarize(common.interleaved(timed, args.rounds, args.warmup, args.inner), "base", "peft")
    return [{"mode": mode, "contender": name, **extra, **stats} for name, stats in summary.items()]


def run(args) -> list[dict]:
    rows = []
    xs, gs = inputs(args, args.m)
    for rank in args.ranks:
        for dropout in args.dropouts:
            shape = {"m": args.m, "k": args.k, "n": args.n, "rank": rank, "dtype": args.dtype, "dropout": dropout,
                     "flop_floor_ratio": flop_floor_ratio(args.m, args.k, args.n, rank)}
            layers = make_layers(args, rank, dropout)
            for mode in ("forward", "backward", "forward+backward"):
                found = measure(layers, mode, xs, gs, args, shape)
                if mode == "forward+backward":
                    for row in found:
                        row.update(memory(layers[row["contender"]], xs[0], gs[0]))
                rows += found
        layers = make_layers(args, rank, 0.0)
        merged = {f"{name} merged": copy.deepcopy(layers[name])
                  for name in ("peftlite torch", "peft") if name in layers}
        peftlite.merge(merged["peftlite torch merged"].layer)
        if "peft merged" in merged:
            merged["peft merged"].merge()
        for m in [args.m, *args.decode]:
            dx, dg = (xs, gs) if m == args.m else inputs(args, m, grad=False)
            extra = {"m": m, "k": args.k, "n": args.n, "rank": rank, "dtype": args.dtype, "dropout": 0.0}
            rows += measure({**layers, **merged}, "inference", dx, dg, args, extra)
    return rows


COLUMNS = [("mode", "<17", "mode"), ("contender", "<22", "contender"), ("m", ">5", "m"), ("r", ">3", "rank"),
           ("drop", ">4.2f", "dropout"), ("median ms", ">10.3f", "median_ms"), ("x base", ">7.3f", "ratio_vs_base"),
           ("PEFT/this", ">9.3f", "peft_time_over_this"), ("saved MiB", ">9.1f", common.mib("saved_bytes"))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=2048)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--ranks", type=int, nargs="+", default=[16])
    parser.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.1])
    parser.add_argument("--decode", type=int, nargs="*", default=[1, 16])
    parser.add_argument("--inner", type=int, default=1)
    common.add_run_options(parser, rounds=30, warmup=5)
    args = parser.parse_args()
    name = args.device if args.dtype == "float32" else f"{args.device}-{args.dtype}"
    common.run_and_report(args, run, COLUMNS, name, "lora_layer")


if __name__ == "__main__":
    main()
