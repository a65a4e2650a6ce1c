"""One LoRA layer: frozen base nn.Linear vs peftlite.LoRALinear vs HF PEFT's LoRA, side by side.

Measures forward+backward (training) per dropout, and the inference forward unmerged and merged.
Reports medians and the median of per-round ratios against the frozen base, the FLOP floor
ratio, and saved-activation bytes. Writes benchmarks/results/<device>.json.

    python benchmarks/bench_lora_layer.py [--m 2048 --k 1024 --n 1024 --rank 16 --threads 2]
"""

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import peftlite  # noqa: E402


def make_layers(k, n, rank, dropout, dtype, device):
    torch.manual_seed(0)
    base = nn.Linear(k, n).to(device, dtype).requires_grad_(False)
    ours = peftlite.LoRALinear(copy.deepcopy(base), rank, alpha=2 * rank, dropout=dropout)
    with torch.no_grad():
        ours.lora_B.normal_(0, 0.02)  # trained-looking, nonzero
    layers = {"base": base, "peftlite": ours}
    try:
        layers["peft"] = common.peft_twin(base, ours, rank, dropout)
    except ImportError:
        print("peft is not installed: PEFT rows skipped (pip install peft)")
    return layers


def train_step(layer, x, grad):
    def step():
        layer(x).backward(grad)
        x.grad = None
        for p in layer.parameters():
            p.grad = None
    return step


def infer_step(layer, x):
    def step():
        with torch.no_grad():
            layer(x)
    return step


def flop_floor_ratio(m, k, n, rank) -> float:
    """(base + LoRA FLOPs) / base FLOPs for forward+backward: the ratio if the extra work ran at base speed."""
    base = 4 * m * n * k  # forward x W^T, backward dx = g W (no dW: frozen)
    lora = 6 * m * rank * (k + n)  # forward 2Mr(K+N), backward dt, dB, dA, dx-term
    return (base + lora) / base


def check_agreement(layers, x):
    with torch.no_grad():
        for layer in layers.values():
            layer.eval()
        if "peft" in layers:
            torch.testing.assert_close(layers["peftlite"](x), layers["peft"](x), rtol=1e-4, atol=1e-4)
        for layer in layers.values():
            layer.train()


def run(args) -> list[dict]:
    rows = []
    dtype, device = getattr(torch, args.dtype), args.device
    x = torch.randn(args.m, args.k, device=device, dtype=dtype)
    grad = torch.randn(args.m, args.n, device=device, dtype=dtype)
    shape = {"m": args.m, "k": args.k, "n": args.n, "rank": args.rank, "dtype": args.dtype}
    for dropout in args.dropouts:
        layers = make_layers(args.k, args.n, args.rank, dropout, dtype, device)
        check_agreement(layers, x)
        xg = x.clone().requires_grad_(True)
        steps = {name: train_step(layer, xg, grad) for name, layer in layers.items()}
        summary = common.summarize(common.interleaved(steps, args.rounds, args.warmup), "base", "peft")
        saved = {name: common.saved_activation_bytes(lambda m=layer: m(xg)) for name, layer in layers.items()}
        for name, stats in summary.items():
            rows.append({"mode": "forward+backward", "contender": name, "dropout": dropout, **shape, **stats,
                         "saved_bytes": saved[name], "flop_floor_ratio": flop_floor_ratio(args.m, args.k, args.n,
                                                                                           args.rank)})
    layers = make_layers(args.k, args.n, args.rank, 0.0, dtype, device)
    for layer in layers.values():
        layer.eval()
    merged = {f"{name} merged": copy.deepcopy(layer) for name, layer in layers.items() if name != "base"}
    peftlite.merge(merged["peftlite merged"])
    if "peft merged" in merged:
        merged["peft merged"].merge()
    steps = {name: infer_step(layer, x) for name, layer in {**layers, **merged}.items()}
    summary = common.summarize(common.interleaved(steps, args.rounds, args.warmup), "base")
    for name, stats in summary.items():
        rows.append({"mode": "inference", "contender": name, "dropout": 0.0, **shape, **stats})
    return rows


def print_table(rows):
    print(f"{'mode':<17} {'contender':<16} {'dropout':>7} {'median ms':>10} {'x base':>7} {'saved MiB':>10}")
    for r in rows:
        saved = f"{r['saved_bytes'] / 2**20:10.1f}" if "saved_bytes" in r else " " * 10
        print(f"{r['mode']:<17} {r['contender']:<16} {r['dropout']:>7.2f} {r['median_ms']:>10.2f} "
              f"{r['ratio_vs_base']:>7.3f} {saved}")
    for dropout in sorted({r["dropout"] for r in rows if r["mode"] == "forward+backward"}):
        by = {r["contender"]: r for r in rows if r["mode"] == "forward+backward" and r["dropout"] == dropout}
        if "peft" in by:
            print(f"forward+backward, dropout {dropout}: peftlite is "
                  f"{by['peftlite']['peft_time_over_this']:.2f}x faster than PEFT (median per-round ratio) "
                  f"(FLOP floor {by['peftlite']['flop_floor_ratio']:.3f}x base)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=2048)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.1])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    common.run_and_report(args, run, print_table, args.device, "lora_layer")

if __name__ == "__main__":
    main()
