"""combine_adapters: a new LoRA adapter from a weighted combination of others, computed on the deltas.

Per layer, with each adapter's delta as a matrix ``D_i = scaling_i * B_i A_i`` [out, in * kernel]
(A and B flattened past their first axis; every kind's delta is a re-layout of it):

- ``"cat"``: ``D = sum_i w_i D_i`` exactly, as rank ``sum_i r_i``: A's stacked, B's side by side,
  B_i scaled by ``w_i * scaling_i`` (one rounding each), the new scaling 1.
- ``"svd"``: the same ``D``, truncated to ``rank`` by its SVD (computed from the stacked factors,
  never forming D); the relative Frobenius error ``||D - D_k|| / ||D||`` is reported per layer.
- ``"ties"`` (Yadav et al. 2023, arXiv 2306.01708): trim each ``D_i`` to its ``density`` share of
  largest magnitudes (default 0.2), weight it, ``u_i = w_i trim(D_i)``; elect each entry's sign
  ``sign(sum_i u_i)``; ``D`` = the mean of the ``u_i`` that agree with it (disjoint mean); then SVD.
- ``"dare"`` (Yu et al. 2023, arXiv 2311.03099): drop each entry of every ``D_i`` with probability
  ``drop`` (default 0.9), rescale the rest by ``1 / (1 - drop)``, ``D = sum_i w_i dare(D_i)``; then SVD.

PEFT combines A and B separately for its linear, ties and dare modes, which is not the weighted
sum of the deltas; here every mode is defined on the deltas. SVDs run in float64.
"""

import math

import torch
from torch import nn

from .adapters import adapter_names, lora_names, refuse_merged
from .errors import MAX_SCALE, PeftliteError, check_adapter_name, check_positive_int, check_probability, finite_number
from .lora import LoRALayer, LoRASettings, add_lora, lora_layers
from .model import refuse_in_context, unwrap

METHODS = ("cat", "svd", "ties", "dare")


def combine_adapters(model: nn.Module, weights: dict, name: str, how: str = "cat", rank: int | None = None,
                     density: float = 0.2, drop: float = 0.9, seed: int = 0) -> dict[str, float]:
    """Add LoRA adapter ``name`` combining ``weights`` (``{adapter: w}``) on every layer holding one of them.

    The new adapter is not active until ``set_adapter``; it is a LoRA adapter like any other
    (saved, merged, trained). ``rank``: the new rank for ``svd``/``ties``/``dare`` (default: the
    largest combined rank); ``density`` for ties, ``drop`` and ``seed`` for dare. Returns
    ``{layer: relative Frobenius error of the rank truncation}`` (0.0 everywhere for ``cat``).
    """
    bare = unwrap(model)
    refuse_in_context(bare, "combine_adapters")
    check_request(bare, weights, name, how, rank, density, drop, seed)
    refuse_merged(bare, "combine_adapters")
    generator = torch.Generator().manual_seed(seed)
    plans = {}
    for path, layer in lora_layers(bare).items():
        parts = [(n, float(w)) for n, w in weights.items() if n in layer.lora_settings]
        if parts:
            plans[path] = layer, combine_layer(layer, parts, how, rank, density, drop, generator)
    dtypes = {path: layer.lora_A[next(n for n in weights if n in layer.lora_settings)].dtype
              for path, (layer, _) in plans.items()}  # the new adapter's: that of the first combined one
    for path, (layer, (lora_A, lora_B, _)) in plans.items():  # check all before adding any
        if not all(bool(t.to(dtypes[path]).isfinite().all()) for t in (lora_A, lora_B)):
            raise PeftliteError(f"combine_adapters: the combination at layer '{path}' holds NaN or Inf in "
                                f"{dtypes[path]} (weights too large for the adapters' values); nothing was added.")
    for path, (layer, (lora_A, lora_B, _)) in plans.items():
        dtype = dtypes[path]
        active = layer.lora_active
        add_lora(layer, layer.lora_kind, name, LoRASettings(lora_A.shape[0], float(lora_A.shape[0])), "default", dtype)
        layer.lora_active = active  # not active until set_adapter
        with torch.no_grad():
            layer.lora_A[name].copy_(lora_A.reshape(layer.lora_A[name].shape))
            layer.lora_B[name].copy_(lora_B.reshape(layer.lora_B[name].shape))
        for param in (layer.lora_A[name], layer.lora_B[name]):
            param.requires_grad_(False)
    return {path: error for path, (_, (_, _, error)) in plans.items()}


def check_request(model: nn.Module, weights, name, how, rank, density, drop, seed) -> None:
    present = lora_names(model)
    if not isinstance(weights, dict) or not weights:
        raise PeftliteError(f"weights={weights!r}: expected a dict {{adapter name: weight}}, e.g. "
                            f"{{'a': 0.7, 'b': 0.3}}; this model's LoRA adapters are {present}.")
    for adapter, weight in weights.items():
        if adapter not in present:
            raise PeftliteError(f"combine_adapters: {adapter!r} is not a LoRA adapter of this model; its LoRA "
                                f"adapters are {present}.")
        if not finite_number(weight, MAX_SCALE):
            raise PeftliteError(f"combine_adapters: the weight of {adapter!r} is {weight!r}; expected a finite number "
                                f"of magnitude at most {MAX_SCALE:g}.")
    check_adapter_name(name)
    if name in adapter_names(model):
        raise PeftliteError(f"combine_adapters: name={name!r} is taken; pick a new name for the combination.")
    if how not in METHODS:
        raise PeftliteError(f"how={how!r}: expected one of {', '.join(map(repr, METHODS))}.")
    if rank is not None:
        if how == "cat":
            raise PeftliteError("rank= applies to how='svd', 'ties' and 'dare'; 'cat' is exact at the summed rank.")
        check_positive_int("rank", rank)
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise PeftliteError(f"density={density!r}: expected the share of entries TIES keeps, in (0, 1].")
    check_probability("drop", drop)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise PeftliteError(f"seed={seed!r}: expected an integer.")


def combine_layer(layer: LoRALayer, parts: list[tuple[str, float]], how: str, rank, density: float, drop: float,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(A [k, in*kernel], B [out, k], relative truncation error)`` of the combination at one layer (float64,
    on the CPU)."""
    factors = [(layer.lora_A[n].detach().to("cpu", torch.float64).flatten(1),
                layer.lora_B[n].detach().to("cpu", torch.float64).flatten(1) * layer.lora_settings[n].scaling)
               for n, _ in parts]  # D_i = B_i A_i with the scaling in B
    weights = [w for _, w in parts]
    if how in ("cat", "svd"):
        lora_A = torch.cat([a for a, _ in factors])
        lora_B = torch.cat([b * w for (_, b), w in zip(factors, weights)], dim=1)
        if how == "cat":
            return lora_A, lora_B, 0.0
    rank = rank if rank is not None else max(layer.lora_settings[n].rank for n, _ in parts)
    if how == "svd":
        return truncate_factors(lora_A, lora_B, rank)
    deltas = [b @ a for a, b in factors]
    combined = ties(deltas, weights, density) if how == "ties" else dare(deltas, weights, drop, generator)
    return truncate(combined, rank)


def ties(deltas: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """TIES-merging: trim to the top ``density`` magnitudes, weight, elect signs, disjoint mean."""
    trimmed = torch.stack([w * trim(d, density) for d, w in zip(deltas, weights)])  # [n, out, in]
    sign = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    return (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """``delta`` with all but its ``ceil(density * numel)`` largest magnitudes set to zero."""
    keep = max(1, math.ceil(density * delta.numel()))
    flat = delta.flatten()
    kept = torch.zeros_like(flat)
    index = flat.abs().topk(keep).indices
    kept[index] = flat[index]
    return kept.view_as(delta)


def dare(deltas: list[torch.Tensor], weights: list[float], drop: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: drop entries with probability ``drop``, rescale survivors by ``1 / (1 - drop)``, weighted sum."""
    total = torch.zeros_like(deltas[0])
    for delta, weight in zip(deltas, weights):
        keep = torch.rand(delta.shape, generator=generator, dtype=torch.float64) >= drop
        total += weight * torch.where(keep, delta / (1 - drop), 0.0)
    return total


def truncate(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` factors of ``delta`` [out, in] (Eckart-Young): ``(A, B, relative error)``."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return split(u, s, vh, rank)


def truncate_factors(lora_A: torch.Tensor, lora_B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """As :func:`truncate` for ``delta = B A`` without forming it: QR of both factors, SVD of the small core."""
    q_b, r_b = torch.linalg.qr(lora_B)  # B = Q_b R_b
    q_a, r_a = torch.linalg.qr(lora_A.t())  # A^T = Q_a R_a
    u, s, vh = torch.linalg.svd(r_b @ r_a.t())  # core [R, R]
    return split(q_b @ u, s, vh @ q_a.t(), rank)


def split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``B = U_k sqrt(S_k)``, ``A = sqrt(S_k) V_k^T`` (zero-padded to ``rank``), and ``||S_rest|| / ||S||``."""
    total = float(s.square().sum())
    kept = min(rank, s.numel())
    root = s[:kept].sqrt()
    lora_B = torch.zeros(u.shape[0], rank, dtype=u.dtype)
    lora_A = torch.zeros(rank, vh.shape[1], dtype=u.dtype)
    lora_B[:, :kept] = u[:, :kept] * root
    lora_A[:kept] = root[:, None] * vh[:kept]
    error = math.sqrt(float(s[kept:].square().sum()) / total) if total else 0.0
    return lora_A, lora_B, error
