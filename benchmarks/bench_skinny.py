"""The adapters' weight gradients on CPU: one ``mm`` vs sums over row blocks, per thread count, side by side.

``dA = dt^T h`` and ``dB^T = t^T g`` are ``a^T b`` for a tall, skinny ``a`` [M, r] and a tall ``b``
[M, K]. ``peftlite/ops/skinny.py`` runs them as one batched product over c row blocks plus a sum when
its rule (``blocks``) says so. For each thread count and shape this times one ``mm`` and the blocked
sum at several block counts (whole rounds of the thread count, and the rule's choice, marked), so the
rule can be checked, and re-derived on machines with more cores. Writes
benchmarks/results/skinny-<device>.json.

    python benchmarks/bench_skinny.py                          # 1 and 2 threads, M=512..8192, K=1024/4096, r=4..128
    python benchmarks/bench_skinny.py --threads 4 8 16         # a machine with more cores
"""

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from peftlite.ops.skinny import blocks, transposed_product  # noqa: E402

MIN_BLOCK_ROWS = 64  # candidates with fewer rows per block are not timed


def candidates(threads: int, rows: int, rule: int) -> list[int]:
    """Block counts to time: 1, 2, 4 and 8 rounds of the thread count, and the rule's choice."""
    rounds = [threads * j for j in (1, 2, 4, 8)]
    counts = {c for c in rounds if 2 <= c <= 64 and rows // c >= MIN_BLOCK_ROWS} | ({rule} if rule > 1 else set())
    return sorted(counts)


def measure(args, threads: int, rows: int, cols: int, rank: int) -> list[dict]:
    dtype = getattr(torch, args.dtype)
    pairs = [(torch.randn(rows, rank, dtype=dtype), torch.randn(rows, cols, dtype=dtype)) for _ in range(2)]
    turn = itertools.cycle(range(len(pairs)))
    rule = blocks(rows, rank, pairs[0][1])

    def product(count):
        def run():
            a, b = pairs[next(turn)]
            return transposed_product(a, b, count)
        return run
    contenders = {"mm": product(1), **{f"blocks={c}": product(c) for c in candidates(threads, rows, rule)}}
    summary = common.summarize(common.interleaved(contenders, args.rounds, args.warmup), "mm")
    shape = {"threads": threads, "m": rows, "k": cols, "rank": rank, "dtype": args.dtype, "rule_blocks": rule}
    return [{**shape, "contender": name, "blocks": 1 if name == "mm" else int(name.split("=")[1]),
             "median_ms": stats["median_ms"], "ratio_vs_mm": stats["ratio_vs_base"]}
            for name, stats in summary.items()]


def run(args) -> list[dict]:
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for m, k, r in itertools.product(args.m, args.k, args.ranks):
            rows += measure(args, threads, m, k, r)
    return rows


def verdicts(rows: list[dict]) -> list[dict]:
    """Per thread count and shape: the rule's ratio to one ``mm`` and the best count timed."""
    out = []
    for key, group in itertools.groupby(rows, key=lambda row: (row["threads"], row["m"], row["k"], row["rank"])):
        group = list(group)
        best = min(group, key=lambda row: row["ratio_vs_mm"])
        chosen = next(row for row in group if row["blocks"] == max(group[0]["rule_blocks"], 1))
        out.append({"threads": key[0], "m": key[1], "k": key[2], "rank": key[3], "mm_ms": group[0]["median_ms"],
                    "rule_blocks": chosen["blocks"], "rule_ratio": chosen["ratio_vs_mm"], "best_blocks": best["blocks"],
                    "best_ratio": best["ratio_vs_mm"]})
    return out


COLUMNS = [("thr", ">3", "threads"), ("m", ">5", "m"), ("k", ">5", "k"), ("r", ">3", "rank"),
           ("mm ms", ">8.3f", "mm_ms"), ("rule c", ">6", "rule_blocks"), ("rule/mm", ">7.2f", "rule_ratio"),
           ("best c", ">6", "best_blocks"), ("best/mm", ">7.2f", "best_ratio")]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--m", type=int, nargs="+", default=[512, 1000, 2048, 4096, 8192])
    parser.add_argument("--k", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 32, 64, 128])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    print(f"device: {common.device_name()}")
    rows = run(args)
    common.print_table(verdicts(rows), COLUMNS)
    meta = common.metadata(benchmark="skinny", rounds=args.rounds, warmup=args.warmup, threads=args.threads)
    common.write_results("skinny", meta, rows, args.out)


if __name__ == "__main__":
    main()
