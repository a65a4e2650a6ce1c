"""Dropout on a layer input: peftlite's seeded positions vs a dense Philox mask vs F.dropout, side by side.

What one pass of the torch path pays for dropout, split up: drawing the dropped positions from the
seed, and building h (x with the drops zeroed: a copy, then zeroing the positions). Beside it, the
alternatives a GPU could use instead: a dense keep mask from a generator seeded with the same seed
(``bernoulli_``: one kernel on CUDA, Philox) applied by a multiply, and ``F.dropout`` (what PEFT
runs; it also scales). A plain copy of x is the floor every variant pays. Writes
benchmarks/results/dropout-<device>.json.

    python benchmarks/bench_dropout.py                            # CPU: 2048 x 1024, p = 0.1, fp32
    python benchmarks/bench_dropout.py --device cuda --dtype bfloat16 --shapes 8192x4096 1024x4096
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from peftlite.ops.dropout import drop_positions_padded, spare_slot  # noqa: E402


def contenders(x: torch.Tensor, p: float) -> dict:
    rows, cols = x.shape
    seeds = iter(range(1, 1 << 62))

    def copy():
        return x.clone()

    def draw():
        return drop_positions_padded(x.numel(), p, next(seeds), x.device)

    def positions():  # what the torch path does per pass
        drop = drop_positions_padded(x.numel(), p, next(seeds), x.device)
        h, flat = spare_slot(rows, cols, x)
        h.copy_(x)
        return flat.index_fill_(0, drop, 0)

    def dense_mask():
        generator = torch.Generator(device=x.device).manual_seed(next(seeds))
        keep = torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1 - p, generator=generator)
        return x * keep

    def f_dropout():
        return F.dropout(x, p, training=True)

    return {"copy of x": copy, "peftlite draw": draw, "peftlite positions": positions,
            "dense Philox mask": dense_mask, "F.dropout": f_dropout}


def run(args) -> list[dict]:
    rows = []
    for shape in args.shapes:
        m, k = (int(v) for v in shape.split("x"))
        x = torch.randn(m, k, device=args.device, dtype=getattr(torch, args.dtype))
        times = common.interleaved(contenders(x, args.p), args.rounds, args.warmup)
        for name, stats in common.summarize(times, "copy of x", "F.dropout").items():
            rows.append({"contender": name, "m": m, "k": k, "p": args.p, "dtype": args.dtype,
                         "median_us": stats.pop("median_ms") * 1e3, **stats})
    return rows


COLUMNS = [("contender", "<20", "contender"), ("m", ">6", "m"), ("k", ">6", "k"), ("median us", ">10.1f", "median_us"),
           ("x copy", ">7.2f", "ratio_vs_base"), ("F.dropout/this", ">14.2f", "F.dropout_time_over_this")]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["2048x1024", "512x512"])
    parser.add_argument("--p", type=float, default=0.1)
    common.add_run_options(parser, rounds=50, warmup=5)
    args = parser.parse_args()
    common.run_and_report(args, run, COLUMNS, "dropout", "dropout")


if __name__ == "__main__":
    main()
