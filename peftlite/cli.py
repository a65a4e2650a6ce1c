"""The ``peftlite`` command: ``peftlite merge`` and ``peftlite extract`` (also ``python -m peftlite``).

Errors are one line on stderr and exit code 1 (2 for bad usage), never a traceback; an interrupted
run exits 130 and leaves nothing that looks complete.
"""

import argparse
import sys
import time

from .errors import PeftliteError


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except (PeftliteError, OSError) as err:  # OSError: whatever the file system says, as one line
        print(f"peftlite {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\npeftlite {args.command}: interrupted; nothing complete was written.", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftlite", description="Export LoRA adapters without the model's code.")
    commands = parser.add_subparsers(dest="command")
    merge = commands.add_parser("merge", help="merge LoRA adapters into a safetensors checkpoint, streaming",
                                description="Merge LoRA adapters into a safetensors checkpoint, tensor by tensor.")
    merge.add_argument("base", help="a .safetensors file, a directory with one, or a sharded checkpoint")
    merge.add_argument("adapter", help="a PEFT-format LoRA directory (several named adapters in subfolders)")
    merge.add_argument("out", help="the directory to write (same shards, names, dtypes; other files copied)")
    merge.add_argument("--adapter", dest="adapters", action="append", metavar="NAME[:WEIGHT]",
                       help="an adapter of a multi-adapter directory and its weight (default 1); repeatable")
    merge.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="store every floating tensor so")
    merge.add_argument("--device", default="cpu", help="where deltas are computed (cpu, cuda)")
    merge.add_argument("--force", action="store_true", help="write into a non-empty OUT")
    merge.set_defaults(run=run_merge)
    extract = commands.add_parser("extract", help="extract a LoRA adapter from a fine-tuned checkpoint",
                                  description="Extract a LoRA adapter (truncated SVD of TUNED - BASE), streaming.")
    extract.add_argument("base")
    extract.add_argument("tuned")
    extract.add_argument("out")
    extract.add_argument("--rank", type=int, required=True, help="the rank (the cap, with --energy)")
    extract.add_argument("--energy", type=float, help="per layer, the smallest rank keeping this share of the "
                                                      "delta's squared Frobenius norm")
    extract.add_argument("--targets", nargs="+", help="module names to extract (default: every 2-D weight but "
                                                      "embeddings and heads)")
    extract.add_argument("--fan-in-fan-out", action="store_const", const=True, default=None,
                         help="weights stored [in, out] (GPT-2); default: as BASE's config.json says")
    extract.add_argument("--device", default="cpu")
    extract.add_argument("--force", action="store_true")
    extract.set_defaults(run=run_extract)
    return parser


def parse_adapters(values) -> dict | None:
    if not values:
        return None
    chosen = {}
    for value in values:
        name, _, weight = value.partition(":")
        try:
            chosen[name] = float(weight) if weight else 1.0
        except ValueError:
            raise PeftliteError(f"--adapter {value!r}: expected NAME or NAME:WEIGHT with a number.") from None
    return chosen


def run_merge(args) -> int:
    from .export import merge_checkpoint

    with Progress("merge") as progress:
        result = merge_checkpoint(args.base, args.adapter, args.out, adapters=parse_adapters(args.adapters),
                                  dtype=args.dtype, device=args.device, force=args.force, progress=progress)
    for note in result["notes"]:
        print(f"note: {note}")
    rate = result["bytes"] / max(result["seconds"], 1e-9) / 2**20
    print(f"merged {result['merged']} tensors, replaced {result['replaced']}, copied {result['copied']}; "
          f"{result['bytes'] / 2**20:.1f} MiB in {result['seconds']:.1f} s ({rate:.0f} MiB/s) -> {args.out}")
    return 0


def run_extract(args) -> int:
    from .export import extract_adapter

    with Progress("extract") as progress:
        result = extract_adapter(args.base, args.tuned, args.out, rank=args.rank, energy=args.energy,
                                 targets=args.targets, device=args.device, fan_in_fan_out=args.fan_in_fan_out,
                                 force=args.force, progress=progress)
    for module, (rank, error) in result["layers"].items():
        print(f"{module}: rank {rank}, relative error {error:.3e}")
    if result["whole"]:
        print(f"saved whole (changed, not LoRA targets): {', '.join(result['whole'])}")
    print(f"extracted {len(result['layers'])} layers ({result['skipped']} unchanged) in {result['seconds']:.1f} s "
          f"-> {args.out}")
    return 0


class Progress:
    """``(done, total, bytes done, bytes total)`` shown on a terminal: tqdm when installed, else one line."""

    def __init__(self, command: str, stream=sys.stderr):
        self.command, self.stream = command, stream
        self.live = stream.isatty()
        self.bar, self.last = None, 0.0

    def __enter__(self):
        return self

    def __call__(self, done: int, total: int, done_bytes: int, total_bytes: int) -> None:
        if not self.live:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        if tqdm is not None:
            if self.bar is None:
                self.bar = tqdm(total=total, unit="tensor", desc=f"peftlite {self.command}", file=self.stream)
            self.bar.update(done - self.bar.n)
            return
        now = time.monotonic()
        if now - self.last > 0.2 or done == total:
            self.last = now
            size = f", {done_bytes / 2**20:.0f}/{total_bytes / 2**20:.0f} MiB" if total_bytes else ""
            self.stream.write(f"\rpeftlite {self.command}: {done}/{total} tensors{size}")
            self.stream.flush()

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        elif self.live and self.last:
            self.stream.write("\n")
        return False
