"""Merge/unmerge cycles: peftlite's exact unmerge vs HF PEFT's subtract-back, in each dtype.

For a 1024x1024 layer with a trained-looking adapter: max |W - W_original| after N cycles, the
bytes peftlite keeps per merged weight element, and the time of one merge+unmerge cycle.
Writes benchmarks/results/merge-<device>.json.

    python benchmarks/bench_merge.py [--cycles 1000 --size 1024 --rank 16]
"""

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import peftlite  # noqa: E402


def layers(size, rank, dtype):
    torch.manual_seed(0)
    base = nn.Linear(size, size).to(dtype)
    ours = peftlite.LoRALinear(copy.deepcopy(base), rank, alpha=2 * rank)
    with torch.no_grad():
        ours.lora_B["default"].normal_(0, 0.02)
    out = {"peftlite": ours}
    try:
        out["peft"] = common.peft_twin(base, ours, rank)
    except ImportError:
        print("peft is not installed: PEFT rows skipped")
    return base.weight.detach().clone(), out


def cycle(layer):
    layer.merge()
    layer.unmerge()


def weight_of(name, layer):
    return layer.weight if name == "peftlite" else layer.base_layer.weight


def run(args):
    rows = []
    for dtype_name in ("float32", "bfloat16", "float16"):
        original, contenders = layers(args.size, args.rank, getattr(torch, dtype_name))
        for name, layer in contenders.items():
            times = []
            for _ in range(args.cycles):
                start = time.perf_counter()
                cycle(layer)
                times.append(time.perf_counter() - start)
            error = (weight_of(name, layer).detach().double() - original.double()).abs().max().item()
            state = None
            if name == "peftlite":
                layer.merge()
                state = layer.merge_state_bytes() / layer.weight.numel()
                layer.unmerge()
            rows.append({"contender": name, "dtype": dtype_name, "cycles": args.cycles, "size": args.size,
                         "rank": args.rank, "max_abs_error": error,
                         "bit_exact": bool(torch.equal(weight_of(name, layer).detach(), original)),
                         "cycle_ms": 1e3 * statistics.median(times), "merge_state_bytes_per_element": state})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=1000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = run(args)
    print(f"{'contender':<10} {'dtype':<9} {'cycles':>6} {'max |W - W0|':>13} {'exact':>6} {'cycle ms':>9} "
          f"{'B/elem':>7}")
    for r in rows:
        state = "" if r["merge_state_bytes_per_element"] is None else f"{r['merge_state_bytes_per_element']:.4f}"
        print(f"{r['contender']:<10} {r['dtype']:<9} {r['cycles']:>6} {r['max_abs_error']:>13.3e} "
              f"{str(r['bit_exact']):>6} {r['cycle_ms']:>9.2f} {state:>7}")
    common.write_results("merge", common.metadata(benchmark="merge_cycles"), rows, args.out)


if __name__ == "__main__":
    main()
