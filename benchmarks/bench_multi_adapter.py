"""Several adapters in one Llama-style model: a batch whose rows use different adapters.

8 LoRA adapters of rank 16 on every linear layer, a batch of 32 rows spread over them (4 rows
each, shuffled). Contenders, interleaved in one run on the same model and weights:

- ``base``: the frozen model;
- ``peftlite one adapter``: one adapter applied to the whole batch (``set_adapter``), the target;
- ``peftlite per-row``: ``peftlite.adapter_per_row(model, names)``;
- ``peft one adapter`` and ``peft per-row``: PEFT on the same weights (``model(..., adapter_names=names)``).

Modes: ``decode`` (1 new token per row on a KV cache of ``--context`` tokens, cropped back after
each step), ``prefill`` (``--seq`` tokens per row), both inference; ``train step`` (prefill
shape, forward + backward + AdamW step, PEFT has no per-row training). Also times
``set_adapter`` switches and ``disable_adapters`` entry plus exit. Writes
benchmarks/results/multi-adapter-<device>.json.

    python benchmarks/bench_multi_adapter.py [--hidden 512 --layers 4 --batch 32 --seq 128 --threads 2]
"""

import argparse
import contextlib
import copy
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import peftlite  # noqa: E402
from peftlite.ops.row_mix import GATHER_FROM  # noqa: E402


def build(args):
    """(peftlite model with ``--adapters`` adapters, PEFT model with the same weights or None, names)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads // 2, max_position_embeddings=args.context + args.seq + 8)
    dtype = getattr(torch, args.dtype)
    names = [f"task{i}" for i in range(args.adapters)]
    ours = LlamaForCausalLM(config).to(args.device, dtype).eval()
    base_state = {k: v.clone() for k, v in ours.state_dict().items()}
    for name in names:
        peftlite.inject(ours, rank=args.rank, alpha=2 * args.rank, name=name)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, p in ours.named_parameters():
            if "lora_B" in key:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    try:
        import peft
    except ImportError:
        print("peft is not installed: PEFT rows skipped (pip install peft)")
        return ours, None, names
    with tempfile.TemporaryDirectory() as directory:
        peftlite.save_adapter(ours, directory)  # task0..: one folder each
        plain = LlamaForCausalLM(config).to(args.device, dtype)
        plain.load_state_dict(base_state)
        theirs = peft.PeftModel.from_pretrained(plain, Path(directory) / names[0], adapter_name=names[0])
        for name in names[1:]:
            theirs.load_adapter(Path(directory) / name, adapter_name=name)
    return ours, theirs.eval(), names


def row_names(args, names) -> list[str]:
    rows = [names[i % len(names)] for i in range(args.batch)]
    random.Random(0).shuffle(rows)
    return rows


def decode_steps(models, theirs, rows, args) -> dict:
    """One cached decode step per contender (the cache cropped back to the context after each)."""
    ids = torch.randint(0, args.vocab, (args.batch, args.context), device=args.device)
    token = torch.randint(0, args.vocab, (args.batch, 1), device=args.device)

    def prepared(model, **extra):
        with torch.no_grad():
            cache = model(input_ids=ids, use_cache=True, **extra).past_key_values

        def step():
            with torch.no_grad():
                model(input_ids=token, past_key_values=cache, use_cache=True, **extra)
            cache.crop(-1)  # back to the context
        return step

    return contenders(models, theirs, rows, prepared, enter_each_call=False)


def prefill_steps(models, theirs, rows, args) -> dict:
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device)

    def prepared(model, **extra):
        def step():
            with torch.no_grad():
                model(input_ids=ids, **extra)
        return step

    return contenders(models, theirs, rows, prepared)


def contenders(models, theirs, rows, prepared, enter_each_call: bool = True) -> dict:
    """{name: step}. The per-row step enters ``adapter_per_row`` on every call (a new batch each time), or,
    for decode, runs inside one entry (a batch decodes many tokens; the entry is timed on its own)."""
    mixed = prepared(models["rows"])

    def per_row():
        if not enter_each_call:
            return mixed()
        with peftlite.adapter_per_row(models["rows"], rows):
            return mixed()

    steps = {"base": prepared(models["base"]), "peftlite one adapter": prepared(models["one"]),
             "peftlite per-row": per_row}
    if theirs is not None:
        steps["peft one adapter"] = prepared(theirs["one"])
        steps["peft per-row"] = prepared(theirs["rows"], adapter_names=rows)
    return steps


def train_steps(models, rows, args) -> dict:
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device)

    def step_for(model, per_row):
        optimizer = {}

        def step():
            with peftlite.adapter_per_row(model, rows) if per_row else contextlib.nullcontext():
                model(input_ids=ids, labels=ids).loss.backward()
                params = [p for p in model.parameters() if p.requires_grad]
                optimizer.setdefault("adamw", torch.optim.AdamW(params, lr=1e-5)).step()
            model.zero_grad(set_to_none=True)
        return step

    for model in models.values():
        model.train()
    return {"peftlite one adapter": step_for(models["one"], False),  # the frozen base has nothing to train
            "peftlite per-row": step_for(models["rows"], True)}


def switch_times(ours, names, rows, rounds: int) -> dict:
    """Median microseconds of one set_adapter switch, one disable_adapters entry + exit, and one
    adapter_per_row entry + exit (the grouping of a batch's rows)."""
    switches, disables, groupings = [], [], []
    for i in range(rounds):
        start = time.perf_counter()
        with peftlite.adapter_per_row(ours, rows):
            pass
        groupings.append(time.perf_counter() - start)
        start = time.perf_counter()
        peftlite.set_adapter(ours, names[i % len(names)])
        switches.append(time.perf_counter() - start)
        start = time.perf_counter()
        with peftlite.disable_adapters(ours):
            pass
        disables.append(time.perf_counter() - start)
    median = lambda values: 1e6 * sorted(values)[len(values) // 2]  # noqa: E731
    return {"set_adapter_us": median(switches), "disable_adapters_us": median(disables),
            "adapter_per_row_us": median(groupings)}


def copies(ours, theirs, names) -> tuple[dict, dict | None]:
    """One model per mode, so no contender pays another's switch: the frozen base (adapters disabled for
    good by deleting them), one adapter active, all of them for per-row; PEFT's one-adapter and per-row."""
    models = {"one": copy.deepcopy(ours), "rows": ours, "base": copy.deepcopy(ours)}
    peftlite.set_adapter(models["one"], names[0])
    for name in names:
        peftlite.delete_adapter(models["base"], name)
    if theirs is None:
        return models, None
    one = copy.deepcopy(theirs)
    one.set_adapter(names[0])
    return models, {"one": one, "rows": theirs}


def form_rows(args, names, rows) -> list[dict]:
    """Where the gathered form overtakes the stacked one (``peftlite.lora.GATHER_FROM``): one adapted
    Linear (hidden -> 8/3 hidden, the MLP's up projection) under a per-row batch, both forms timed side
    by side at each number of tokens per row, inference."""
    import peftlite.lora

    torch.manual_seed(0)
    host = torch.nn.Sequential(torch.nn.Linear(args.hidden, args.hidden * 8 // 3)).to(args.device)
    for name in names:
        peftlite.inject(host, rank=args.rank, name=name)
    found = []
    with peftlite.adapter_per_row(host, rows), torch.no_grad():
        for tokens in (1, 2, 4, 8, 16, 64):
            x = torch.randn(args.batch, tokens, args.hidden, device=args.device)
            steps = {}
            for form, threshold in (("stacked", 10**9), ("gathered", 1)):
                def step(threshold=threshold):
                    peftlite.lora.GATHER_FROM = threshold
                    host(x)
                steps[form] = step
            times = common.interleaved(steps, args.rounds, args.warmup)
            summary = common.summarize(times, "stacked")
            for form, stats in summary.items():
                found.append({"mode": "form", "contender": form, "tokens": tokens, "batch": args.batch,
                              "hidden": args.hidden, "adapters": len(names), "rank": args.rank, **stats})
    peftlite.lora.GATHER_FROM = GATHER_FROM
    return found


def run(args) -> list[dict]:
    ours, theirs, names = build(args)
    rows = row_names(args, names)
    models, peft_models = copies(ours, theirs, names)
    shape = {"hidden": args.hidden, "layers": args.layers, "batch": args.batch, "adapters": args.adapters,
             "rank": args.rank, "dtype": args.dtype}
    results = []
    plans = (("decode", lambda: decode_steps(models, peft_models, rows, args), {"context": args.context, "tokens": 1}),
             ("prefill", lambda: prefill_steps(models, peft_models, rows, args), {"tokens": args.seq}),
             ("train step", lambda: train_steps(models, rows, args), {"tokens": args.seq}))
    for mode, make, extra in plans:
        with peftlite.adapter_per_row(models["rows"], rows) if mode == "decode" else contextlib.nullcontext():
            steps = make()
            rounds = args.rounds if mode == "decode" else max(args.rounds // 2, 5)
            times = common.interleaved(steps, rounds, args.warmup)
        summary = common.summarize(times, "base" if "base" in times else "peftlite one adapter")
        for name, stats in summary.items():
            row = {"mode": mode, "contender": name, **shape, **extra, **stats}
            row["ratio_vs_one_adapter"] = common.summarize(times, "peftlite one adapter")[name]["ratio_vs_base"]
            if "peft per-row" in times and name == "peftlite per-row":
                row["peft_time_over_this"] = common.summarize(
                    {name: times[name], "peft per-row": times["peft per-row"]}, name, "peft per-row")[name][
                    "peft per-row_time_over_this"]
            results.append(row)
    results += form_rows(args, names, rows)
    models["rows"].eval()
    results.append({"mode": "switch", "contender": "peftlite", **shape, **switch_times(models["rows"], names, rows, 200)})
    return results


COLUMNS = [("mode", "<10", "mode"), ("contender", "<22", "contender"), ("tokens", ">6", "tokens"),
           ("median ms", ">10.2f", "median_ms"),
           ("x base", ">7.3f", "ratio_vs_base"), ("x one", ">7.3f", "ratio_vs_one_adapter"),
           ("PEFT/this", ">9.3f", "peft_time_over_this"), ("switch us", ">9.1f", "set_adapter_us"),
           ("disable us", ">10.1f", "disable_adapters_us"), ("per-row us", ">10.1f", "adapter_per_row_us")]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    common.add_run_options(parser, rounds=20, warmup=2)
    args = parser.parse_args()
    common.run_and_report(args, run, COLUMNS, "multi-adapter", "multi_adapter")


if __name__ == "__main__":
    main()
