"""Write peftlite's dispatch table (``peftlite/ops/dispatch.json``) from CUDA layer benchmark results.

For every shape, dtype, mode and dropout that ``bench_lora_layer.py`` timed on both the ``torch`` and the
``triton`` path, the faster one (lower median of per-round ratios to the frozen base) becomes an entry;
"forward+backward" rows give the ``train`` mode, "inference" rows (unmerged, decoding included) ``infer``.
Entries of the same group and shape already in the table are replaced, others kept.

    python benchmarks/dispatch_table.py $OUT/layer-cuda*.json                       # into the package's table
    python benchmarks/dispatch_table.py $OUT/layer-cuda*.json --out $OUT/dispatch.json
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from peftlite.ops.dispatch import Entry, TABLE  # noqa: E402

MODES = {"forward+backward": "train", "inference": "infer"}
PATHS = {"peftlite torch": "torch", "peftlite triton": "triton"}


def timed_pairs(result: dict) -> dict[tuple, dict[str, float]]:
    """``{entry key (Entry's fields but backend): {"torch": ratio, "triton": ratio}}`` from one results file."""
    arch = result["meta"].get("arch")
    if arch is None:
        raise SystemExit(f"results from {result['meta'].get('device')!r} carry no GPU architecture ('arch'): "
                         "dispatch entries come from CUDA runs of benchmarks/bench_lora_layer.py only")
    pairs = {}
    for row in result["rows"]:
        mode, path = MODES.get(row["mode"]), PATHS.get(row["contender"])
        if mode is None or path is None:
            continue
        dropout = mode == "train" and row["dropout"] > 0
        key = (arch, row["dtype"], mode, dropout, row["m"], row["k"], row["n"], row["rank"])
        pairs.setdefault(key, {})[path] = row["ratio_vs_base"]
    return pairs


def entries(result: dict) -> list[dict]:
    """The winners of one results file, as table rows (the Entry fields plus the ratios and provenance)."""
    meta, rows = result["meta"], []
    for key, ratios in timed_pairs(result).items():
        if set(ratios) != set(PATHS.values()):
            continue  # a winner needs both paths timed in the same run
        backend = min(ratios, key=ratios.get)
        rows.append({**dict(zip(Entry._fields, (*key, backend))), "torch_x_base": round(ratios["torch"], 4),
                     "triton_x_base": round(ratios["triton"], 4), "device": meta["device"],
                     "commit": meta["commit"], "date": meta["date"]})
    return rows


def merged(table: dict, new: list[dict]) -> dict:
    """``table`` with ``new`` rows replacing those of the same group and shape, sorted."""
    key = lambda row: tuple(row[name] for name in Entry._fields[:-1])  # noqa: E731
    rows = {key(row): row for row in table["entries"]}
    rows.update({key(row): row for row in new})
    return {**table, "entries": [rows[k] for k in sorted(rows)]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="bench_lora_layer.py JSON files from CUDA runs")
    parser.add_argument("--out", type=Path, default=TABLE, help=f"table to update (default {TABLE})")
    args = parser.parse_args()
    table = json.loads((args.out if args.out.exists() else TABLE).read_text())
    new = [row for path in args.results for row in entries(json.loads(path.read_text()))]
    args.out.write_text(json.dumps(merged(table, new), indent=1) + "\n")
    for row in new:
        print(f"{row['arch']} {row['dtype']:9} {row['mode']:5} dropout={row['dropout']!s:5} M={row['m']:<5} "
              f"K={row['k']:<5} N={row['n']:<5} r={row['rank']:<3} torch {row['torch_x_base']:.3f}x  "
              f"triton {row['triton_x_base']:.3f}x  -> {row['backend']}")
    print(f"wrote {args.out} ({len(new)} measured shapes)")


if __name__ == "__main__":
    main()
