"""Training stacks: DDP on 2 CPU processes (gloo) against one process, and Trainer checkpoints against PEFT's.

DDP: a Llama-style model built from a config with LoRA on every linear layer; each process runs one
thread on its own batch (the same per-process batch as the single process); the step (forward, loss,
backward, AdamW) is timed per process, one process, two DDP processes and two processes training apart
(no DDP: what sharing the machine alone costs) alternating (``--rounds`` each). A DDP communication hook counts the bytes all-reduced per step, against the bytes
of the whole model's gradients.
Trainer: the same model, adapters of the same rank, trained 4 steps by ``peftlite.hf.Trainer`` and by
``transformers.Trainer`` on PEFT's model; the checkpoint's bytes (all files, and the model or adapter
files alone) and the time of ``save_model``.
DPO: a training step of TRL's ``DPOTrainer`` (policy forward, reference forward with the adapters switched
off, loss, backward) on the same model, pairs of ``--seq`` tokens (prompt and completions of a random-word
vocabulary, fp32): ``peftlite.trl.DPOTrainer`` (reference: ``BaseReference``) against ``trl.DPOTrainer`` on
PEFT's model (reference: PEFT's ``disable_adapter``), interleaved, ``--rounds`` x 4 steps each.
Writes benchmarks/results/training-<device>.json.

    python benchmarks/bench_training.py [--hidden 512 --layers 4 --batch 2 --seq 128 --rounds 3]
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import peftlite  # noqa: E402


def build(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=args.hidden // 128, max_position_embeddings=args.seq + 8)
    return LlamaForCausalLM(config)


def step_times(args, distributed: bool, wrap: bool = True) -> dict:
    """Median step seconds of this process, and bytes all-reduced per step (0 without DDP). ``wrap=False``:
    two processes each training alone (no DDP, nothing exchanged), the floor set by sharing the machine."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    model = peftlite.inject(build(args), rank=args.rank, alpha=2 * args.rank).train()
    counted = [0]
    if distributed:
        dist.init_process_group("gloo")
    if distributed and wrap:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counting(state, bucket):
            counted[0] += bucket.buffer().numel() * bucket.buffer().element_size()
            return allreduce_hook(state, bucket)

        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        wrapped.register_comm_hook(None, counting)
    else:
        wrapped = model
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-4)
    rank = dist.get_rank() if distributed else 0
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(rank))
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        wrapped(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        if step == args.warmup - 1:
            counted[0] = 0
    result = {"seconds": statistics.median(times[args.warmup:]), "allreduce_bytes": counted[0] / args.steps,
              "gradient_bytes": sum(p.numel() * 4 for p in model.parameters()), "rank": rank}
    if distributed:
        dist.barrier()  # no rank leaves while another still talks to it
        dist.destroy_process_group()
    return result


def launch_pair(script: list[str], child: str, timeout: float) -> dict:
    """A 2-process child run; a launch whose gloo rendezvous stalls (it happens on shared VMs) is retried once."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *script,
               f"--child={child}"]
    for attempt in range(2):
        try:
            done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=timeout)
            return json.loads(done.stdout.strip().splitlines()[-1])
        except subprocess.TimeoutExpired:
            if attempt:
                raise


def ddp_rows(args) -> list[dict]:
    script = [sys.argv[0], *[f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                             if k in ("hidden", "layers", "vocab", "batch", "seq", "rank", "steps", "warmup")]]
    single, double, apart = [], [], []
    for _ in range(args.rounds):
        done = subprocess.run([sys.executable, *script, "--child=single"], capture_output=True, text=True, check=True)
        single.append(json.loads(done.stdout.strip().splitlines()[-1]))
        double.append(launch_pair(script, "ddp", args.launch_timeout))
        apart.append(launch_pair(script, "apart", args.launch_timeout))
    one, two, floor = (statistics.median(r["seconds"] for r in runs) for runs in (single, double, apart))
    shape = {"hidden": args.hidden, "layers": args.layers, "batch_per_process": args.batch, "seq": args.seq,
             "rank": args.rank, "threads_per_process": 1}
    return [{"mode": "ddp", "contender": "1 process", **shape, "median_ms": 1e3 * one, "ratio_vs_one": 1.0},
            {"mode": "ddp", "contender": "2 processes apart (no DDP)", **shape, "median_ms": 1e3 * floor,
             "ratio_vs_one": floor / one},
            {"mode": "ddp", "contender": "2 processes (DDP, gloo)", **shape, "median_ms": 1e3 * two,
             "ratio_vs_one": two / one, "ratio_vs_apart": two / floor, "allreduce_bytes_per_step": double[0]["allreduce_bytes"],
             "model_gradient_bytes": double[0]["gradient_bytes"],
             "allreduce_share": double[0]["allreduce_bytes"] / double[0]["gradient_bytes"]}]


class Tokens(torch.utils.data.Dataset):
    def __init__(self, args):
        self.ids = torch.randint(0, args.vocab, (16, args.seq), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def twins(args, ours, theirs):
    """``(name, model, trainer class)``: the model with peftlite's LoRA for ``ours``, with PEFT's (same rank,
    alpha and targets) for ``theirs``."""
    import peft

    yield "peftlite", peftlite.inject(build(args), rank=args.rank, alpha=2 * args.rank), ours
    config = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear")
    yield "peft", peft.get_peft_model(build(args), config), theirs


def trainer_rows(args) -> list[dict]:
    import transformers

    from peftlite.hf import Trainer

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, model, cls in twins(args, Trainer, transformers.Trainer):
            out = Path(scratch) / name
            targs = transformers.TrainingArguments(str(out), max_steps=4, save_steps=4, per_device_train_batch_size=2,
                                                   use_cpu=True, report_to=[], logging_steps=100)
            trainer = cls(model=model, args=targs, train_dataset=Tokens(args))
            trainer.train()
            checkpoint = out / "checkpoint-4"
            files = {p.name: p.stat().st_size for p in checkpoint.iterdir() if p.is_file()}
            weights = sum(size for file, size in files.items() if file.endswith(".safetensors"))
            seconds = []
            for i in range(5):
                start = time.perf_counter()
                trainer.save_model(str(out / f"final-{i}"))
                seconds.append(time.perf_counter() - start)
            rows.append({"mode": "trainer checkpoint", "contender": name, "checkpoint_bytes": sum(files.values()),
                         "weights_bytes": weights, "save_model_ms": 1e3 * statistics.median(seconds),
                         "files": sorted(files)})
    return rows


def preference_pairs(args):
    """A word-level tokenizer over ``--vocab`` words and 8 (prompt, chosen, rejected) pairs of random words."""
    import datasets
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(args.vocab - 3)]
    vocab = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    vocab.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=vocab, pad_token="<pad>", eos_token="<eos>")
    g = torch.Generator().manual_seed(0)

    def text(n):
        return " ".join(words[3 + int(i)] for i in torch.randint(0, args.vocab - 3, (n,), generator=g))

    half = args.seq // 2
    pairs = datasets.Dataset.from_dict({"prompt": [text(half) + " " for _ in range(8)],
                                        "chosen": [text(half - 1) for _ in range(8)],
                                        "rejected": [text(half - 1) for _ in range(8)]})
    return tokenizer, pairs


def dpo_rows(args) -> list[dict]:
    import trl

    from peftlite.trl import DPOTrainer

    tokenizer, pairs = preference_pairs(args)
    steps = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, model, cls in twins(args, DPOTrainer, trl.DPOTrainer):
            model.config.pad_token_id = 0
            targs = trl.DPOConfig(str(Path(scratch) / name), per_device_train_batch_size=args.batch, use_cpu=True,
                                  bf16=False, report_to=[], max_length=args.seq + 8)
            trainer = cls(model=model, args=targs, train_dataset=pairs, processing_class=tokenizer)
            inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(args.batch)])
            trainer.model.train()
            trainer.current_gradient_accumulation_steps = 1  # set by train(); the step is timed alone here

            def step(trainer=trainer, inputs=inputs):
                trainer.training_step(trainer.model, inputs)
                trainer.model.zero_grad(set_to_none=True)

            steps[name] = step
        times = common.interleaved(steps, rounds=args.rounds, warmup=1, inner=4)
    summary = common.summarize(times, baseline="peftlite", rival="peft")
    shape = {"hidden": args.hidden, "layers": args.layers, "pairs": args.batch, "seq": args.seq, "rank": args.rank}
    return [{"mode": "dpo step", "contender": name, **shape, "median_ms": summary[name]["median_ms"],
             "peft_time_over_this": summary[name]["peft_time_over_this"]} for name in steps]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=["dpo"], default=None, help="run the DPO rows alone")
    parser.add_argument("--launch-timeout", type=float, default=300,
                        help="seconds before a stalled 2-process launch is retried (once)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", choices=["single", "ddp", "apart"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        result = step_times(args, distributed=args.child != "single", wrap=args.child == "ddp")
        if result["rank"] == 0:  # one line: the processes' outputs would interleave
            print(json.dumps(result), flush=True)
        return
    rows = dpo_rows(args) if args.only == "dpo" else ddp_rows(args) + trainer_rows(args) + dpo_rows(args)
    for row in rows:
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "files"})
    common.write_results("training", common.metadata(benchmark="training"), rows, args.out)


if __name__ == "__main__":
    main()
