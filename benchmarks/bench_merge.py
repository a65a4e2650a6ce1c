"""Merging: in memory (merge/unmerge cycles) and on disk (a checkpoint merged with ``peftlite merge``).

Cycles: for a 1024x1024 layer with a trained-looking adapter: max |W - W_original| after N cycles of
peftlite's exact unmerge vs HF PEFT's subtract-back, in each dtype, the bytes peftlite keeps per merged
weight element, and the time of one merge+unmerge cycle. Writes benchmarks/results/merge-<device>.json.

``--checkpoint``: a Llama-style checkpoint of a few hundred MB built from a config and a LoRA adapter
on every linear layer; ``peftlite merge`` (streaming) vs PEFT (``from_pretrained`` +
``PeftModel.from_pretrained`` + ``merge_and_unload`` + ``save_pretrained``), and ``peftlite extract``
(rank 16) of the merged result, each in its own process, rounds alternating: wall time and how far each
raises its process's peak resident memory. Writes benchmarks/results/merge-checkpoint-<device>.json.

    python benchmarks/bench_merge.py [--cycles 1000 --size 1024 --rank 16]
    python benchmarks/bench_merge.py --checkpoint [--hidden 768 --layers 8 --vocab 16000 --rounds 3]
"""

import argparse
import copy
import json
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


CHILD = """
import json, sys, time
which, base, adapter, out = sys.argv[1:5]
import torch
if which.startswith('peftlite'):
    from peftlite.export import extract_adapter, merge_checkpoint
else:
    import peft, transformers
def rss(field):
    return next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith(field)) * 1024
open('/proc/self/clear_refs', 'w').write('5')  # the peak from here on: the work, not the imports
before, start = rss('VmRSS'), time.perf_counter()
if which == 'peftlite merge':
    merge_checkpoint(base, adapter, out, force=True)
elif which == 'peftlite extract':
    extract_adapter(base, adapter, out, rank=16, force=True)
else:
    model = transformers.AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    peft.PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out, safe_serialization=True)
print(json.dumps({'seconds': time.perf_counter() - start, 'peak_rise_bytes': rss('VmHWM') - before}))
"""


def build_checkpoint(args, directory: Path) -> int:
    """A Llama-style checkpoint and a rank-16 adapter on every linear layer; returns the checkpoint's bytes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=args.hidden // 128, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory / "base")
    peftlite.inject(model, rank=args.rank, alpha=2 * args.rank)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    peftlite.save_adapter(model, directory / "adapter")
    return sum(p.stat().st_size for p in (directory / "base").glob("*.safetensors"))


def checkpoint_rows(args) -> list[dict]:
    import subprocess
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        size = build_checkpoint(args, scratch)
        jobs = {"peftlite merge": (scratch / "base", scratch / "adapter", scratch / "ours"),
                "peft merge_and_unload": (scratch / "base", scratch / "adapter", scratch / "theirs"),
                "peftlite extract": (scratch / "base", scratch / "ours", scratch / "extracted")}
        found = {name: [] for name in jobs}
        for _ in range(args.rounds):
            for name, paths in jobs.items():
                done = subprocess.run([sys.executable, "-c", CHILD, name, *map(str, paths)], capture_output=True,
                                      text=True, check=True)
                found[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
        for name, runs in found.items():
            seconds = statistics.median(r["seconds"] for r in runs)
            peak = statistics.median(r["peak_rise_bytes"] for r in runs)
            rows.append({"contender": name, "checkpoint_bytes": size, "hidden": args.hidden, "layers": args.layers,
                         "vocab": args.vocab, "rank": args.rank, "rounds": args.rounds, "seconds": seconds,
                         "peak_rise_bytes": peak})
    peft_row = next(r for r in rows if r["contender"] == "peft merge_and_unload")
    for row in rows:
        row["peak_over_peft"] = row["peak_rise_bytes"] / peft_row["peak_rise_bytes"]
        row["time_over_peft"] = row["seconds"] / peft_row["seconds"]
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=1000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--checkpoint", action="store_true", help="merge a checkpoint on disk instead")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.checkpoint:
        rows = checkpoint_rows(args)
        print(f"{'contender':<22} {'MiB':>7} {'seconds':>8} {'peak rise MiB':>14} {'peak / PEFT':>11} "
              f"{'time / PEFT':>11}")
        for r in rows:
            print(f"{r['contender']:<22} {r['checkpoint_bytes'] / 2**20:>7.0f} {r['seconds']:>8.2f} "
                  f"{r['peak_rise_bytes'] / 2**20:>14.1f} {r['peak_over_peft']:>11.3f} {r['time_over_peft']:>11.3f}")
        common.write_results("merge-checkpoint", common.metadata(benchmark="merge_checkpoint"), rows, args.out)
        return
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
