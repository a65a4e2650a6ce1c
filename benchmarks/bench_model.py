"""A Llama-style decoder built from a config: frozen base vs peftlite (LoRA, Adapter, prefix) vs HF PEFT.

One training step (forward, loss, backward, optimizer step on the trainable parameters) and one
inference forward, for each contender in one interleaved run. The frozen base's "training
step" is forward + backward to the input embeddings (it has nothing to update). All contenders
take ``inputs_embeds`` that require grad, so they do the same base work. Reports medians, the
median of per-round ratios against the frozen base and against PEFT's same method, trainable
parameters and saved-activation bytes. Writes benchmarks/results/model-<device>.json.

    python benchmarks/bench_model.py [--hidden 512 --layers 4 --batch 2 --seq 256 --threads 2]
    python benchmarks/bench_model.py --compile   # LoRA eager and under torch.compile, side by side

With ``--compile`` the contenders are the base and LoRA (peftlite, PEFT), each eager and as
``torch.compile(model)`` (a copy of the same weights; warmed up past compilation, compile time reported
apart); compiled rows also carry their ratio to the compiled base. Writes model-compile-<device>.json.
"""

import argparse
import copy
import ctypes
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import peftlite  # noqa: E402



def lora_name(library: str, dropout: float) -> str:
    return f"{library} lora" + (f" p={dropout:g}" if dropout else "")


COMPILED = " compiled"


def rivals(args) -> dict[str, str]:
    """{peftlite contender: PEFT's same method}, eager and compiled."""
    pairs = {lora_name("peftlite", p): lora_name("peft", p) for p in args.lora_dropouts}
    pairs = {**pairs, "peftlite prefix": "peft prefix"}
    return {**pairs, **{ours + COMPILED: theirs + COMPILED for ours, theirs in pairs.items()}}


def build_base(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads // 2, max_position_embeddings=args.seq + 64)
    return LlamaForCausalLM(config).to(args.device, getattr(torch, args.dtype)).requires_grad_(False)


def contenders(base, args) -> dict:
    """{name: model}: every model holds a copy of the same base weights."""
    models = {"base": base}
    for p in args.lora_dropouts:
        models[lora_name("peftlite", p)] = peftlite.inject(copy.deepcopy(base), rank=args.rank, alpha=2 * args.rank,
                                                           dropout=p)
    if not args.compile:
        models["peftlite adapter"] = peftlite.inject(copy.deepcopy(base), method="adapter",
                                                     targets=["o_proj", "down_proj"], reduction_factor=16)
        models["peftlite prefix"] = peftlite.inject(copy.deepcopy(base), method="prefix", prefix_len=args.prefix)
    try:
        from peft import LoraConfig, PrefixTuningConfig, get_peft_model
    except ImportError:
        print("peft is not installed: PEFT rows skipped (pip install peft)")
        return models
    for p in args.lora_dropouts:
        models[lora_name("peft", p)] = get_peft_model(copy.deepcopy(base), LoraConfig(
            r=args.rank, lora_alpha=2 * args.rank, lora_dropout=p, target_modules="all-linear", task_type="CAUSAL_LM"))
    if not args.compile:
        models["peft prefix"] = get_peft_model(copy.deepcopy(base), PrefixTuningConfig(
            num_virtual_tokens=args.prefix, task_type="CAUSAL_LM"))
    return models


def compiled_twins(models: dict) -> dict:
    """Each contender beside ``torch.compile`` of a copy of it (the same weights, its own parameters)."""
    return {**models, **{name + COMPILED: torch.compile(copy.deepcopy(model)) for name, model in models.items()}}


def compile_seconds(steps: dict) -> dict[str, float]:
    """Seconds of the first call of each compiled step (tracing and code generation), run once here."""
    seconds = {}
    for name, step in steps.items():
        if name.endswith(COMPILED):
            start = time.perf_counter()
            step()
            seconds[name] = time.perf_counter() - start
    return seconds


def train_step(model, embeds, labels):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step():
        loss = model(inputs_embeds=embeds, labels=labels).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        embeds.grad = None
    return step


def peak_bytes(step) -> int | None:
    """Peak GPU memory above the starting point during one step (None on CPU)."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - start


def infer_step(model, embeds):
    def step():
        with torch.no_grad():
            model(inputs_embeds=embeds)
    return step


def setup(args):
    """(contenders, token ids, input embeddings that require grad)."""
    base = build_base(args)
    models = contenders(base, args)
    if args.compile:
        models = compiled_twins(models)
    torch.manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device)
    embeds = base.get_input_embeddings()(ids).detach().requires_grad_(True)
    return models, ids, embeds


def resident_kib(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_child(args) -> None:
    """``--rss-of NAME`` (a fresh process): how far 3 training steps of one contender raise resident memory.

    The other contenders are dropped and freed heap memory is handed back to the OS (``malloc_trim``),
    so the steps cannot hide in memory left over from building; then the peak counter is reset
    (``/proc/self/clear_refs``) and the steps' peak is read against the resident size before them.
    """
    models, ids, embeds = setup(args)
    model = models.pop(args.rss_of).train()
    models.clear()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    step = train_step(model, embeds, ids)
    Path("/proc/self/clear_refs").write_text("5")
    before = resident_kib("VmRSS")
    for _ in range(3):
        step()
    print(json.dumps({"peak_rss_bytes": (resident_kib("VmHWM") - before) * 1024}))


def peak_rss_bytes(names) -> dict[str, int]:
    """Per contender, in its own process (RSS peaks are per process): CPU peak memory of a training step."""
    found = {}
    for name in names:
        done = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--rss-of", name], capture_output=True,
                              text=True, check=True)
        found[name] = json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_bytes"]
    return found


def run(args) -> list[dict]:
    models, ids, embeds = setup(args)
    shape = {"batch": args.batch, "seq": args.seq, "hidden": args.hidden, "layers": args.layers,
             "heads": args.heads, "kv_heads": args.heads // 2, "rank": args.rank, "prefix_len": args.prefix,
             "dtype": args.dtype}
    for model in models.values():
        model.train()
    steps = {name: train_step(model, embeds, ids) for name, model in models.items()}
    compile_time = compile_seconds(steps)
    train = common.interleaved(steps, args.rounds, args.warmup)
    peak = {name: peak_bytes(step) for name, step in steps.items()}
    measure_rss = args.device == "cpu" and not args.no_peak_rss and not args.compile \
        and Path("/proc/self/clear_refs").exists()
    rss = peak_rss_bytes(models) if measure_rss else {}
    saved = {name: common.saved_activation_bytes(lambda m=model: m(inputs_embeds=embeds, labels=ids).loss)
             for name, model in models.items() if not name.endswith(COMPILED)}
    for model in models.values():
        model.eval()
    infer = common.interleaved({name: infer_step(model, embeds) for name, model in models.items()
                                if " p=" not in name},  # dropout is off in eval: the p=0 rows say it all
                               args.rounds, args.warmup)
    rows = []
    for mode, times in (("train step", train), ("inference", infer)):
        summary = common.summarize(times, "base")
        for name, stats in summary.items():
            dropout = next((p for p in args.lora_dropouts if name.endswith(lora_name("", p))), None)
            row = {"mode": mode, "contender": name, **shape, **stats, "lora_dropout": dropout,
                   "trainable": sum(p.numel() for p in models[name].parameters() if p.requires_grad)}
            if name.endswith(COMPILED):
                row["ratio_vs_compiled_base"] = common.summarize({name: times[name], "base" + COMPILED: times[
                    "base" + COMPILED]}, "base" + COMPILED)[name]["ratio_vs_base"]
                if name in compile_time and mode == "train step":
                    row["compile_s"] = compile_time[name]
            if mode == "train step" and name in saved:
                row["saved_bytes"] = saved[name]
                if peak[name] is not None:
                    row["peak_bytes"] = peak[name]
                if name in rss:
                    row["peak_rss_bytes"] = rss[name]
            rival = rivals(args).get(name)
            if rival in times:
                row["peft_time_over_this"] = common.summarize({name: times[name], rival: times[rival]}, name,
                                                              rival)[name][f"{rival}_time_over_this"]
            rows.append(row)
    return rows


COLUMNS = [("mode", "<11", "mode"), ("contender", "<19", "contender"), ("trainable", ">10,", "trainable"),
           ("median ms", ">10.1f", "median_ms"), ("x base", ">7.3f", "ratio_vs_base"),
           ("PEFT/this", ">9.3f", "peft_time_over_this"), ("saved MiB", ">10.1f", common.mib("saved_bytes")),
           ("peak MiB", ">9.1f", common.mib("peak_rss_bytes", "peak_bytes"))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prefix", type=int, default=16)
    parser.add_argument("--lora-dropouts", type=float, nargs="+", default=[0.0, 0.1])
    parser.add_argument("--no-peak-rss", action="store_true", help="skip the per-contender peak memory (CPU)")
    parser.add_argument("--compile", action="store_true", help="LoRA contenders eager and under torch.compile")
    parser.add_argument("--rss-of", default=None, help=argparse.SUPPRESS)  # internal: peak_rss_bytes' child
    common.add_run_options(parser, rounds=20, warmup=3)
    args = parser.parse_args()
    if args.rss_of:
        torch.set_num_threads(args.threads)
        rss_child(args)
        return
    if args.compile:
        common.run_and_report(args, run, COLUMNS + [("x c.base", ">8.3f", "ratio_vs_compiled_base")],
                              "model-compile", "model --compile")
    else:
        common.run_and_report(args, run, COLUMNS, "model", "model")

if __name__ == "__main__":
    main()
