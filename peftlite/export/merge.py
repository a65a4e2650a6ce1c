"""merge_checkpoint: LoRA adapters merged into a safetensors checkpoint, streaming, without the model's code.

For every target weight W of the checkpoint and every adapter n merged with weight w_n::

    W' = round(W + sum_n w_n * scaling_n * delta_n)

with ``delta_n`` laid out as W is stored (``kinds.py``: [out, in] for Linear, [in, out] for GPT-2's
Conv1D, [num, dim] for Embedding, [out, in, *kernel] for conv), computed in float32 (float64 for
float64 weights) one block of rows at a time and rounded once into the stored dtype (or ``dtype``).
Every other tensor is copied byte for byte (or cast, with ``dtype``); the shard split, the index,
tensor names and order, and the directory's other files (config.json, tokenizer files) are kept.
Modules an adapter saves whole (PEFT's ``modules_to_save``) replace their tensors.

Memory: the tensor being merged (read into its own buffer and updated in place), one block of rows
of float32 temporaries (at most ``BLOCK_BYTES``), and the adapters themselves; copied tensors go
through a 64 MiB buffer. So peak memory stays under ``largest tensor + 3 * BLOCK_BYTES + 64 MiB +
adapters`` (twice the largest tensor when ``dtype`` changes its size), whatever the checkpoint's size.

Everything is checked before the first byte is written: every adapter file (strictly, as
``load_adapter``), every target's tensor, kind and shape, tied weights.
"""

import json
import math
import shutil
import time
from dataclasses import dataclass, field

import torch

from ..errors import MAX_SCALE, PeftliteError, check_flag, finite_number
from ..io import KEY_PREFIX, adapter_folders, check_finite, saved_modules
from ..io.directory import CONFIG_NAME, WEIGHTS_NAME, as_path, check_same_save, read_config, read_weights
from ..io.lora_format import check_config, layer_settings, split_keys
from ..io.safetensors_file import SIZES, StreamWriter, read_tensor
from ..kinds import CONV1D, EMBEDDING, LINEAR, ConvKind
from .checkpoint import INDEX, Checkpoint, Output, open_checkpoint
from .names import resolve_names

BLOCK_BYTES = 64 << 20
FLOATING = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
DTYPE_NAMES = {"fp32": "F32", "float32": "F32", "bf16": "BF16", "bfloat16": "BF16", "fp16": "F16", "float16": "F16"}
HEADS = ("lm_head", "embed_out")
EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings", "shared", "embed_in")


@dataclass
class Part:
    """One adapter's contribution to one tensor: ``factor * delta_rows(A, B)`` of ``kind``."""

    kind: object
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    factor: float
    source: str


@dataclass
class MergePlan:
    parts: dict[str, list[Part]] = field(default_factory=dict)  # checkpoint tensor -> what is added to it
    replaced: dict[str, torch.Tensor] = field(default_factory=dict)  # modules saved whole
    notes: list[str] = field(default_factory=list)


def merge_checkpoint(base, adapter, out, adapters=None, dtype: str | None = None, device: str = "cpu",
                     force: bool = False, progress=None) -> dict:
    """Merge the LoRA adapter(s) in directory ``adapter`` into checkpoint ``base``, writing ``out``.

    ``adapters``: ``{name: weight}`` to pick and weigh adapters of a multi-adapter directory (PEFT's
    layout); default: its single adapter, weight 1. ``dtype``: ``"bf16" | "fp16" | "fp32"`` for every
    floating tensor of the result (default: as stored). ``device``: where deltas are computed.
    ``progress``: called with ``(tensors done, tensors in all, bytes done, bytes in all)``. Returns a
    summary: tensors merged, replaced and copied, bytes, seconds. Raises PeftliteError, with nothing
    complete written, on any bad input.
    """
    started = time.perf_counter()
    check_flag("force", force)
    if progress is not None and not callable(progress):
        raise PeftliteError(f"progress={progress!r}: expected a callable (done, total, bytes done, bytes) or None.")
    checkpoint = open_checkpoint(base)
    code = check_dtype(dtype)
    device = check_device(device)
    plan = plan_merge(checkpoint, as_path(adapter, "ADAPTER"), adapters)
    inputs = [shard.path for shard in checkpoint.shards] + ([checkpoint.root] if checkpoint.root else [])
    output = Output(out, force, inputs + [as_path(adapter, "ADAPTER")])
    try:
        totals = write_merged(checkpoint, plan, output, code, device, progress)
        output.commit(last=(INDEX, "config.json"))
    except OSError as err:  # a full disk, a vanished input
        output.abort()
        raise PeftliteError(f"OUT {output.directory}: writing failed ({err.strerror or err}); nothing complete was "
                            "written.") from None
    except BaseException:
        output.abort()
        raise
    totals["seconds"] = time.perf_counter() - started
    totals["notes"] = plan.notes
    return totals


def check_dtype(dtype) -> str | None:
    if dtype is None:
        return None
    if dtype not in DTYPE_NAMES:
        raise PeftliteError(f"dtype={dtype!r}: expected one of bf16, fp16, fp32 (or None to keep each tensor's).")
    return DTYPE_NAMES[dtype]


def check_device(device: str) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise PeftliteError(f"device={device!r}: expected 'cpu' or 'cuda' (or 'cuda:N').") from None
    if device.type not in ("cpu", "cuda"):
        raise PeftliteError(f"device={str(device)!r}: expected 'cpu' or 'cuda' (or 'cuda:N'): deltas are computed "
                            "there.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PeftliteError("device='cuda', but no CUDA device is available here; use --device cpu.")
    return device


# ---- planning: every check before the first write ----

def plan_merge(checkpoint: Checkpoint, directory, weights) -> MergePlan:
    entries = checkpoint.entries()
    plan = MergePlan()
    folders = dict(adapter_folders(directory, None))
    if weights is not None and (not isinstance(weights, dict) or not weights):
        raise PeftliteError(f"adapters={weights!r}: expected a non-empty dict {{name: weight}} of the adapters to "
                            f"merge (ADAPTER holds {sorted(folders)}), or None for its single adapter.")
    if weights is None:
        if len(folders) != 1:
            raise PeftliteError(f"ADAPTER {directory} holds adapters {sorted(folders)}; pick them with --adapter "
                                "NAME[:WEIGHT] (adapters={name: weight}).")
        weights = {next(iter(folders)): 1.0}
    for name, weight in weights.items():
        if not isinstance(name, str) or name not in folders:
            raise PeftliteError(f"ADAPTER {directory} has no adapter {name!r}; it holds {sorted(folders)}.")
        if not finite_number(weight, MAX_SCALE):
            raise PeftliteError(f"the weight of adapter {name!r} is {weight!r}; expected a finite number of "
                                f"magnitude at most {MAX_SCALE:g}.")
        plan_adapter(plan, checkpoint, entries, folders[name], f"{name}" if len(folders) > 1 else "", float(weight))
    return plan


def plan_adapter(plan: MergePlan, checkpoint: Checkpoint, entries: dict, folder, label: str, weight: float) -> None:
    config = read_config(folder / CONFIG_NAME)
    tensors, metadata = read_weights(folder)
    source = str(folder / WEIGHTS_NAME)
    check_finite(tensors, source)
    if config.get("peft_type") != "LORA":
        raise PeftliteError(f"{folder / CONFIG_NAME}: peft_type {config.get('peft_type')!r}; only LoRA adapters can "
                            "be merged into weights (prefixes and bottleneck adapters add computation).")
    check_config(config, str(folder / CONFIG_NAME))
    check_same_save(folder, config, metadata)
    pairs, others = split_keys(tensors, source)
    names = resolve_names(list(pairs), set(entries), source)
    plan.notes += names.notes
    for path, (kind_key, lora_A, lora_B) in pairs.items():
        target = names.tensor(path, "weight")
        if target is None:
            raise missing_target(checkpoint, entries, path, source)
        refuse_tied(checkpoint, entries, path, target, source)
        settings = layer_settings(config, path)
        kind = layer_kind(kind_key, lora_A, lora_B, entries[target][1], settings.rank, config, path, target, source)
        part = Part(kind, lora_A, lora_B, weight * settings.scaling, f"{source}: {path}")
        plan.parts.setdefault(target, []).append(part)
    prefix = KEY_PREFIX["LORA"]
    listed = saved_modules.config_entries(config, source)
    for key, tensor in others.items():
        module_key = key.removeprefix(prefix)
        path, _, parameter = module_key.rpartition(".")
        own = path.endswith(".base_layer") and path.removesuffix(".base_layer") in pairs  # save_embedding_layers
        path = path.removesuffix(".base_layer") if own else path
        check_whole_module(key, path, own, listed, pairs, source)
        target = names.tensor(path, parameter) if key.startswith(prefix) else None
        if target is None:
            raise PeftliteError(f"{source}: '{key}' (a module saved whole) has no tensor in BASE.")
        entry = entries[target][1]
        if list(tensor.shape) != entry.shape or (entry.dtype in FLOATING) != tensor.is_floating_point():
            raise PeftliteError(f"{source}: '{key}' has shape {list(tensor.shape)} and dtype {tensor.dtype}; BASE's "
                                f"'{target}' is {entry.shape} {entry.dtype}.")
        if target in plan.replaced and not torch.equal(plan.replaced[target], tensor):
            raise PeftliteError(f"{source}: '{key}' gives '{target}' other values than another adapter does.")
        plan.replaced[target] = tensor
    if label:
        plan.notes.append(f"adapter {label!r}: {len(pairs)} layers, weight {weight:g}")


def check_whole_module(key: str, path: str, own: bool, listed: list[str], pairs: dict, source: str) -> None:
    """A tensor beside the LoRA pairs is what ``load_adapter`` would accept: a LoRA target's own weight (PEFT's
    ``save_embedding_layers``), or the state of a module the config lists in ``modules_to_save`` that holds
    no LoRA layer of the file (a module both saved whole and adapted would lose its delta)."""
    if own:
        return
    if not saved_modules.is_listed(listed, path):
        raise PeftliteError(f"{source}: unexpected key '{key}'; expected LoRA keys "
                            "('base_model.model.<module>.lora_A.weight', ...) or the state of a module listed in "
                            f"modules_to_save ({listed or 'none listed'}).")
    adapted = next((p for p in pairs if p == path or p.startswith(f"{path}.") or path.startswith(f"{p}.")), None)
    if adapted is not None:
        raise PeftliteError(f"{source}: '{key}' saves module '{path}' whole (modules_to_save), but the file also "
                            f"holds LoRA weights for '{adapted}'; a module is either adapted or saved whole.")


def layer_kind(kind_key, lora_A, lora_B, entry, rank, config, path, target, source):
    """The kind whose delta layout fits the stored weight; raises on a shape that fits none."""
    if lora_A.shape[0] != rank or lora_B.shape[1] != rank:
        raise PeftliteError(f"{source}: layer '{path}' has A {list(lora_A.shape)} and B {list(lora_B.shape)}; the "
                            f"config gives it rank {rank}.")
    if entry.dtype not in FLOATING:
        raise PeftliteError(f"{source}: layer '{path}': BASE's '{target}' has dtype {entry.dtype}; LoRA merges into "
                            "float32, float64, float16 and bfloat16 weights.")
    shape = tuple(entry.shape)
    if kind_key == EMBEDDING.peft_keys[0]:
        kind, expected = EMBEDDING, (lora_A.shape[1], lora_B.shape[0])
    elif lora_A.ndim == 2:
        linear, conv1d = (lora_B.shape[0], lora_A.shape[1]), (lora_A.shape[1], lora_B.shape[0])
        stored_transposed = shape == conv1d and (shape != linear or config.get("fan_in_fan_out", False))
        kind, expected = (CONV1D, conv1d) if stored_transposed else (LINEAR, linear)
    else:
        kind, expected = ConvKind(lora_A.ndim - 2), (lora_B.shape[0], *lora_A.shape[1:])
    if shape != tuple(expected):
        raise PeftliteError(f"{source}: layer '{path}': its delta is {list(expected)} ({kind.name}), BASE's "
                            f"'{target}' is {list(shape)}. Is this adapter for another model?")
    return kind


def missing_target(checkpoint, entries, path, source) -> PeftliteError:
    head = path.rpartition(".")[2] in HEADS
    embedding = next((name for name in entries if name.rpartition(".")[0].rpartition(".")[2] in EMBEDDINGS), None)
    if head and embedding is not None and checkpoint.config().get("tie_word_embeddings", True):
        return PeftliteError(f"{source}: layer '{path}' is the output head, which BASE does not store: it is tied to "
                             f"'{embedding}' (stored once), so merging would change both '{path}' and that "
                             "embedding. Merge without that layer, or untie the weights first.")
    return PeftliteError(f"{source}: layer '{path}' has no tensor '{path}.weight' in BASE. Is this adapter for "
                         "another model?")


def refuse_tied(checkpoint, entries, path, target, source) -> None:
    """An adapter on an input embedding that the checkpoint also uses as its output head (stored once)."""
    if target.rpartition(".")[0].rpartition(".")[2] not in EMBEDDINGS:
        return
    if any(name.rpartition(".")[0].rpartition(".")[2] in HEADS for name in entries):
        return
    if checkpoint.config().get("tie_word_embeddings", False):
        raise PeftliteError(f"{source}: layer '{path}' adapts '{target}', which BASE also uses as its output head "
                            "(tie_word_embeddings, no head tensor stored): merging would change both the embedding "
                            "and the head. Merge without that layer, or untie the weights first.")


# ---- writing ----

def write_merged(checkpoint: Checkpoint, plan: MergePlan, output: Output, code, device, progress) -> dict:
    entries = checkpoint.entries()
    total_bytes = sum(entry.nbytes for _, entry in entries.values())
    done = {"tensors": 0, "bytes": 0}
    counts = {"merged": 0, "replaced": 0, "copied": 0}
    sizes = {}
    for shard in checkpoint.shards:
        layout = [(e.name, out_code(e, code), e.shape) for e in shard.entries]
        try:
            writer = StreamWriter(output.path(shard.path.name), layout, shard.metadata)
        except OSError as err:
            raise PeftliteError(f"OUT {output.directory}: cannot write {shard.path.name} ({err.strerror or err}).") \
                from None
        try:
            with open(shard.path, "rb") as f:
                for entry in shard.entries:
                    kind = write_entry(writer, f, shard.start, entry, plan, out_code(entry, code), device)
                    counts[kind] += 1
                    done["tensors"] += 1
                    done["bytes"] += entry.nbytes
                    if progress is not None:
                        progress(done["tensors"], len(entries), done["bytes"], total_bytes)
            writer.close()
        except (OSError, ValueError) as err:
            try:
                writer.file.close()
            except OSError:
                pass  # the same full disk: the first error is the one to report
            raise PeftliteError(f"{shard.path} -> OUT: {err}") from None
        sizes.update({name: math.prod(shape) * SIZES[dtype] for name, dtype, shape in layout})
    if checkpoint.index is not None:
        index = dict(checkpoint.index)
        index["metadata"] = {**(index.get("metadata") or {}), "total_size": sum(sizes.values())}
        output.path(INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    for extra in checkpoint.extra:
        shutil.copy2(extra, output.path(extra.name))
    return {**counts, "bytes": total_bytes}


def out_code(entry, code) -> str:
    return code if code is not None and entry.dtype in FLOATING else entry.dtype


def write_entry(writer, f, start, entry, plan: MergePlan, code: str, device) -> str:
    """A tensor saved whole replaces the stored one; LoRA deltas are then added to it (a target's own weight in
    the adapter, as PEFT's ``save_embedding_layers`` writes it, and its delta: as ``load_adapter`` applies both)."""
    replaced = plan.replaced.get(entry.name)
    if entry.name in plan.parts:
        weight = read_tensor(f, entry, start) if replaced is None else replaced.to(FLOATING[entry.dtype]).clone()
        writer.write(entry.name, merge_tensor(weight, plan.parts[entry.name], FLOATING[code], device, entry.name))
        return "merged"
    if replaced is not None:
        writer.write(entry.name, replaced.to(FLOATING.get(code, replaced.dtype)))
        return "replaced"
    if code != entry.dtype:
        writer.write(entry.name, read_tensor(f, entry, start).to(FLOATING[code]))
    else:
        writer.copy(entry.name, f, start + entry.begin)
    return "copied"


def merge_tensor(weight: torch.Tensor, parts: list[Part], dtype: torch.dtype, device, name: str) -> torch.Tensor:
    """``round(W + sum factor * delta)`` by blocks of rows, in place where the dtype stays."""
    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
    result = weight if dtype == weight.dtype else torch.empty(weight.shape, dtype=dtype)
    factors = [(p.kind, p.lora_A.to(device, compute), p.lora_B.to(device, compute), p.factor) for p in parts]
    row = max(1, weight[0].numel() if weight.ndim else 1)
    step = max(1, BLOCK_BYTES // (row * 4))
    for r0 in range(0, weight.shape[0], step):
        r1 = min(weight.shape[0], r0 + step)
        block = weight[r0:r1].to(device, compute)
        for kind, lora_A, lora_B, factor in factors:
            block += kind.delta_rows(lora_A, lora_B, r0, r1).mul_(factor)
        rounded = block.to(dtype)
        if not bool(rounded.isfinite().all()):
            raise PeftliteError(f"merging into '{name}' gives NaN or Inf values (rows {r0}-{r1}); nothing was "
                                "written. Check the adapter's values and the weight's dtype.")
        result[r0:r1] = rounded.to("cpu")
    return result
