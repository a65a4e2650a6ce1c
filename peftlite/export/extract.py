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

from ..errors import PeftliteError, check_flag, check_positive_int
from ..io.directory import write_adapter
from ..io.lora_format import PREFIX, common_and_pattern
from ..io.safetensors_file import read_tensor
from .checkpoint import Output, open_checkpoint
from .merge import FLOATING, check_device

SKIPPED = ("embed", "wte", "wpe", "lm_head", "shared")  # embeddings and heads: only when named in targets
TRANSPOSED = ("gpt2", "openai-gpt", "imagegpt")  # config.json model types storing Linear weights [in, out] (Conv1D)
CHUNK = 1 << 26


def extract_adapter(base, tuned, out, rank: int, energy: float | None = None, targets=None, device: str = "cpu",
                    fan_in_fan_out: bool | None = None, force: bool = False, progress=None) -> dict:
    """Write a LoRA adapter of ``tuned - base`` to ``out``; return ``{"layers": {module: (rank, error)},
    "whole": [modules saved whole], "skipped": unchanged targets, "seconds": ...}``.

    ``targets``: module names (exact or dotted suffix) to extract; default every 2-D ``*.weight`` but
    embeddings and output heads. Every other tensor that TUNED changed (embeddings, heads, norms, biases)
    is carried: its module is saved whole (PEFT's ``modules_to_save``), so that at full rank merging the
    adapter into BASE gives TUNED. ``fan_in_fan_out``: the weights are stored [in, out] (GPT-2's Conv1D);
    ``None`` reads it from BASE's ``config.json`` (``model_type``).
    """
    started = time.perf_counter()
    check_positive_int("rank", rank)
    if energy is not None and (isinstance(energy, bool) or not isinstance(energy, (int, float))
                               or not 0 < energy <= 1):
        raise PeftliteError(f"energy={energy!r}: expected the share of the delta's squared norm to keep, in (0, 1].")
    if targets is not None and (not isinstance(targets, (list, tuple)) or not targets
                                or not all(isinstance(t, str) and t for t in targets)):
        raise PeftliteError(f"targets={targets!r}: expected a non-empty list of module names, or None.")
    if fan_in_fan_out is not None:
        check_flag("fan_in_fan_out", fan_in_fan_out)
    check_flag("force", force)
    device = check_device(device)
    base_ckpt, tuned_ckpt = open_checkpoint(base, "BASE"), open_checkpoint(tuned, "TUNED")
    fan_in_fan_out = stored_transposed(base_ckpt.config(), fan_in_fan_out)
    base_entries, tuned_entries = base_ckpt.entries(), tuned_ckpt.entries()
    pairs = plan_pairs(base_entries, tuned_entries, targets)
    whole = changed_modules(base_entries, tuned_entries, pairs)
    output = Output(out, force, [s.path for s in base_ckpt.shards + tuned_ckpt.shards])
    tensors, layers = {}, {}
    try:
        for done, (name, (base_at, tuned_at)) in enumerate(pairs.items(), 1):
            module = name.removesuffix(".weight")
            if module not in whole:
                delta = read_delta(base_at, tuned_at, device, name)
                if fan_in_fan_out:
                    delta = delta.t()
                if bool(delta.any()):
                    lora_A, lora_B, kept, error = factorize(delta, rank, energy, name)
                    tensors[f"{PREFIX}{module}.lora_A.weight"] = lora_A
                    tensors[f"{PREFIX}{module}.lora_B.weight"] = lora_B
                    layers[module] = (kept, error)
            if progress is not None:
                progress(done, len(pairs), 0, 0)
        tensors.update(whole_tensors(tuned_entries, whole))
        if not layers:
            raise PeftliteError("TUNED equals BASE in every target weight: there is no delta to extract"
                                + (f" (it changed only {sorted(whole)}: fine-tune those whole instead)." if whole
                                   else "."))
        write_adapter(output.temporary, tensors, adapter_config(layers, fan_in_fan_out, sorted(whole)))
        output.commit(last=("adapter_config.json",))
    except OSError as err:
        output.abort()
        raise PeftliteError(f"OUT {output.directory}: writing failed ({err.strerror or err}); nothing complete was "
                            "written.") from None
    except BaseException:
        output.abort()
        raise
    return {"layers": layers, "whole": sorted(whole), "skipped": len(pairs) - len(layers) - len(whole),
            "seconds": time.perf_counter() - started}


def stored_transposed(config: dict, given: bool | None) -> bool:
    """Whether BASE stores its Linear weights [in, out]: as given, or as its config.json's model type says.
    A given value that contradicts the config would write an adapter that no library loads: refused."""
    model_type = config.get("model_type")
    says = model_type in TRANSPOSED if isinstance(model_type, str) else None
    if given is None:
        return bool(says)
    if says is not None and given != says:
        raise PeftliteError(f"fan_in_fan_out={given}, but BASE's config.json says model_type {model_type!r}, whose "
                            f"weights are stored {'[in, out]' if says else '[out, in]'}; leave fan_in_fan_out out "
                            "(None) to follow the config.")
    return given


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


def changed_modules(base: dict, tuned: dict, pairs: dict) -> set[str]:
    """Modules holding a tensor, other than the target weights, whose bytes TUNED changed: they are carried
    whole. A module whose target weight is among them is carried whole instead of factorized."""
    if set(base) != set(tuned):
        extra = sorted(set(base) ^ set(tuned))
        raise PeftliteError(f"BASE and TUNED hold different tensors ('{extra[0]}' is in only one); an adapter "
                            "describes a change of values, not of architecture.")
    changed = set()
    for name, (shard, entry) in base.items():
        if name in pairs:
            continue
        other_shard, other = tuned[name]
        if (entry.dtype, entry.shape) != (other.dtype, other.shape):
            raise PeftliteError(f"'{name}' is {entry.dtype} {entry.shape} in BASE and {other.dtype} {other.shape} "
                                "in TUNED; an adapter describes a change of values, not of shape or dtype.")
        if not same_bytes(shard, entry, other_shard, other):
            module = name.rpartition(".")[0]
            if not module:
                raise PeftliteError(f"TUNED changed '{name}', a tensor of no module; it cannot be saved in an adapter.")
            changed.add(module)
    return changed


def same_bytes(shard_a, entry_a, shard_b, entry_b) -> bool:
    with open(shard_a.path, "rb") as a, open(shard_b.path, "rb") as b:
        a.seek(shard_a.start + entry_a.begin)
        b.seek(shard_b.start + entry_b.begin)
        left = entry_a.nbytes
        while left:
            size = min(CHUNK, left)
            if a.read(size) != b.read(size):
                return False
            left -= size
    return True


def whole_tensors(tuned: dict, modules: set[str]) -> dict:
    """TUNED's tensors of each carried module, under the adapter's key prefix."""
    found = {}
    for name, (shard, entry) in tuned.items():
        module, _, leaf = name.rpartition(".")
        if module in modules:
            with open(shard.path, "rb") as f:
                found[f"{PREFIX}{module}.{leaf}"] = read_tensor(f, entry, shard.start)  # its own memory
    return found


def read_delta(base_at, tuned_at, device, name: str) -> torch.Tensor:
    (base_shard, base_entry), (tuned_shard, tuned_entry) = base_at, tuned_at
    with open(base_shard.path, "rb") as f:
        before = read_tensor(f, base_entry, base_shard.start)
    with open(tuned_shard.path, "rb") as f:
        after = read_tensor(f, tuned_entry, tuned_shard.start)
    compute = torch.float64 if torch.float64 in (before.dtype, after.dtype) else torch.float32
    delta = after.to(device, compute) - before.to(device, compute)
    if not bool(delta.isfinite().all()):
        which = "TUNED" if not bool(after.isfinite().all()) else "BASE" if not bool(before.isfinite().all()) else None
        raise PeftliteError(f"'{name}': {which} holds NaN or Inf values; nothing was written." if which else
                            f"'{name}': TUNED - BASE overflows {compute}; nothing was written.")
    return delta


def factorize(delta: torch.Tensor, rank: int, energy, name: str) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """``(A, B, k, relative error)`` of the truncated SVD of ``delta`` [out, in]."""
    try:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    except torch.linalg.LinAlgError as err:
        raise PeftliteError(f"'{name}': the SVD of TUNED - BASE failed ({err}); nothing was written.") from None
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


def adapter_config(layers: dict, fan_in_fan_out: bool, whole: list[str]) -> dict:
    ranks = {module: kept for module, (kept, _) in layers.items()}
    r, rank_pattern = common_and_pattern(ranks)
    alpha, alpha_pattern = common_and_pattern({m: float(k) for m, k in ranks.items()})
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None,
        "r": r, "lora_alpha": alpha, "lora_dropout": 0.0, "use_rslora": False,
        "target_modules": sorted(layers), "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "bias": "none", "fan_in_fan_out": fan_in_fan_out, "use_dora": False, "init_lora_weights": True,
        "modules_to_save": whole or None, "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None,
        "inference_mode": True,
    }
