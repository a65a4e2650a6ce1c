"""extract_adapter: a LoRA adapter from a fine-tuned checkpoint, streaming, one weight pair at a time.

For each 2-D target weight, ``D = TUNED - BASE`` [out, in] (the transpose for GPT-2's Conv1D layout,
``fan_in_fan_out``), and its SVD ``D = U S V^T`` in float32 (float64 for float64 weights)::

    A = sqrt(S_k) V_k^T   [k, in]        B = U_k sqrt(S_k)   [out, k]        alpha = k (scaling 1)

k is ``rank``, or with ``energy`` the smallest rank keeping that share of ``||D||_F^2``, capped at
``rank`` (per-layer ranks go to ``rank_pattern`` / ``alpha_pattern``). The relative error of each
layer, ``||D - B A||_F / ||D||_F = sqrt(sum_{j>=k} s_j^2 / sum_j s_j^2)``, is reported. Weights that
did not change are left out. The result is a PEFT LoRA directory (``load_adapter``,
``PeftModel.from_pretrained``, ``merge_checkpoint``); at full rank, merging it into BASE gives TUNED
to float32 rounding.
"""

import math
import time

import torch

from ..errors import PeftliteError, check_positive_int
from ..io.directory import write_adapter
from ..io.lora_format import PREFIX, common_and_pattern
from ..io.safetensors_file import read_tensor
from .checkpoint import Output, open_checkpoint
from .merge import FLOATING, check_device

SKIPPED = ("embed", "wte", "wpe", "lm_head", "shared")  # embeddings and heads: only when named in targets


def extract_adapter(base, tuned, out, rank: int, energy: float | None = None, targets=None, device: str = "cpu",
                    fan_in_fan_out: bool = False, force: bool = False, progress=None) -> dict:
    """Write a LoRA adapter of ``tuned - base`` to ``out``; return ``{"layers": {module: (rank, error)}, ...}``.

    ``targets``: module names (exact or dotted suffix) to extract; default every 2-D ``*.weight`` but
    embeddings and output heads. ``fan_in_fan_out``: the weights are stored [in, out] (GPT-2).
    """
    started = time.perf_counter()
    check_positive_int("rank", rank)
    if energy is not None and (isinstance(energy, bool) or not isinstance(energy, (int, float))
                               or not 0 < energy <= 1):
        raise PeftliteError(f"energy={energy!r}: expected the share of the delta's squared norm to keep, in (0, 1].")
    if targets is not None and (isinstance(targets, str) or not all(isinstance(t, str) for t in targets)):
        raise PeftliteError(f"targets={targets!r}: expected a list of module names.")
    device = check_device(device)
    base_ckpt, tuned_ckpt = open_checkpoint(base, "BASE"), open_checkpoint(tuned, "TUNED")
    pairs = plan_pairs(base_ckpt.entries(), tuned_ckpt.entries(), targets)
    output = Output(out, force, [s.path for s in base_ckpt.shards + tuned_ckpt.shards])
    tensors, layers = {}, {}
    try:
        for done, (name, (base_at, tuned_at)) in enumerate(pairs.items(), 1):
            delta = read_delta(base_at, tuned_at, device)
            if fan_in_fan_out:
                delta = delta.t()
            if bool(delta.any()):
                module = name.removesuffix(".weight")
                lora_A, lora_B, kept, error = factorize(delta, rank, energy)
                tensors[f"{PREFIX}{module}.lora_A.weight"] = lora_A
                tensors[f"{PREFIX}{module}.lora_B.weight"] = lora_B
                layers[module] = (kept, error)
            if progress is not None:
                progress(done, len(pairs), 0, 0)
        if not layers:
            raise PeftliteError("TUNED equals BASE in every target weight: there is no delta to extract.")
        write_adapter(output.temporary, tensors, adapter_config(layers, fan_in_fan_out))
        output.commit(last=("adapter_config.json",))
    except BaseException:
        output.abort()
        raise
    return {"layers": layers, "skipped": len(pairs) - len(layers), "seconds": time.perf_counter() - started}


def plan_pairs(base: dict, tuned: dict, targets) -> dict:
    """``{tensor name: (BASE's (shard, entry), TUNED's)}`` for every target weight; checks names and shapes."""
    chosen = {}
    for name, (shard, entry) in base.items():
        module = name.removesuffix(".weight")
        if not name.endswith(".weight") or len(entry.shape) != 2 or entry.dtype not in FLOATING:
            continue
        if targets is None:
            if any(part in module.rpartition(".")[2] for part in SKIPPED):
                continue
        elif not any(module == t or module.endswith("." + t) for t in targets):
            continue
        if name not in tuned:
            raise PeftliteError(f"TUNED has no tensor '{name}', which BASE has; are they the same architecture?")
        if tuned[name][1].shape != entry.shape:
            raise PeftliteError(f"'{name}' is {entry.shape} in BASE and {tuned[name][1].shape} in TUNED; extraction "
                                "needs the same shapes.")
        chosen[name] = ((shard, entry), tuned[name])
    if not chosen:
        raise PeftliteError(f"no 2-D weight of BASE matches targets={targets!r}.")
    return chosen


def read_delta(base_at, tuned_at, device) -> torch.Tensor:
    (base_shard, base_entry), (tuned_shard, tuned_entry) = base_at, tuned_at
    with open(base_shard.path, "rb") as f:
        before = read_tensor(f, base_entry, base_shard.start)
    with open(tuned_shard.path, "rb") as f:
        after = read_tensor(f, tuned_entry, tuned_shard.start)
    compute = torch.float64 if torch.float64 in (before.dtype, after.dtype) else torch.float32
    return after.to(device, compute) - before.to(device, compute)


def factorize(delta: torch.Tensor, rank: int, energy) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """``(A, B, k, relative error)`` of the truncated SVD of ``delta`` [out, in]."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    squares = s.double().square()
    total = float(squares.sum())
    kept = min(rank, s.numel())
    if energy is not None:
        share = squares.cumsum(0) / total
        kept = min(kept, int((share < energy - 1e-12).sum()) + 1)
    root = s[:kept].sqrt()
    lora_A = (root[:, None] * vh[:kept]).to("cpu").contiguous()
    lora_B = (u[:, :kept] * root).to("cpu").contiguous()
    error = math.sqrt(max(0.0, float(squares[kept:].sum())) / total)
    return lora_A, lora_B, kept, error


def adapter_config(layers: dict, fan_in_fan_out: bool) -> dict:
    ranks = {module: kept for module, (kept, _) in layers.items()}
    r, rank_pattern = common_and_pattern(ranks)
    alpha, alpha_pattern = common_and_pattern({m: float(k) for m, k in ranks.items()})
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None,
        "r": r, "lora_alpha": alpha, "lora_dropout": 0.0, "use_rslora": False,
        "target_modules": sorted(layers), "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "bias": "none", "fan_in_fan_out": fan_in_fan_out, "use_dora": False, "init_lora_weights": True,
        "modules_to_save": None, "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None,
        "inference_mode": True,
    }
