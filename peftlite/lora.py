"""LoRA on a module of any supported kind, adapters stored by name (Hu et al. 2021, arXiv 2106.09685).

    y = base(x) + sum over adapters n of scaling_n * branch_n(dropout(x))

``branch`` and the shapes of A and B come from the module's kind (``kinds.py``); for a Linear,
``branch(x) = x A^T B^T`` with x [..., in], A [r, in], B [out, r]. scaling = alpha / r
(alpha / sqrt(r) with rslora).

Adapting a module changes its class in place to a generated subclass ``LoRA<Class>`` of
(:class:`LoRALayer`, its class): :class:`LoRALinear` for an exact ``nn.Linear``. The module keeps
its identity, path, parameters, buffers, hooks and ``isinstance`` checks, and its own class's
forward still runs: the low-rank term is added to what it returns. It gains two children,
``lora_A`` and ``lora_B`` (``nn.ParameterDict`` by adapter name), so its state-dict keys become
``<path>.lora_A.<name>`` and ``<path>.lora_B.<name>`` beside the unchanged base keys.
:func:`release` gives the module its class back. Why a class swap and not hooks: ``docs/design.md``.

Where the module runs its kind's own forward ``x W^T + b`` (``nn.Linear``, transformers' ``Conv1D``)
and holds one adapter, the forward is one fused op (``ops/autograd.py``): the low-rank term is
accumulated into the base GEMM, and dropout is a seed, not a mask.
"""

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import (MAX_SCALE, PeftliteError, check_adapter_name, check_flag, check_positive_int, check_probability,
                     finite_number)
from .kinds import LINEAR_LIKE, Kind, require_kind
from .ops import exact_merge
from .ops.backend import lora_linear
from .ops.row_mix import GATHER_FROM, dropout_rows, gathered_term, stacked_term, tokens_per_row

INITS = ("default", "gaussian")
HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class LoRASettings:
    """One adapter's hyper-parameters; ``scaling`` is derived, never stored."""

    rank: int
    alpha: float
    dropout: float = 0.0
    rslora: bool = False

    @property
    def scaling(self) -> float:
        """``alpha / rank``, or ``alpha / sqrt(rank)`` for rank-stabilized LoRA (Kalajdzievski 2023)."""
        return self.alpha / math.sqrt(self.rank) if self.rslora else self.alpha / self.rank


def check_lora_options(rank, alpha, dropout, init, rslora=False) -> None:
    """Raise :class:`PeftliteError` unless the LoRA hyper-parameters are usable."""
    check_positive_int("rank", rank, "typical: 4 to 64. Pass e.g. rank=8")
    if alpha is not None and (not finite_number(alpha, MAX_SCALE) or not alpha > 0):
        raise PeftliteError(f"alpha={alpha!r}: expected a finite number > 0 and at most {MAX_SCALE:g}, or None for "
                            "alpha = rank. scaling is alpha / rank, so e.g. alpha=16 with rank=8 doubles the update.")
    check_probability("dropout", dropout)
    check_flag("rslora", rslora)
    if init not in INITS:
        raise PeftliteError(f"init={init!r}: expected one of {', '.join(map(repr, INITS))}.")


def check_adapter_dtype(dtype) -> None:
    if dtype is not None and dtype not in (torch.float32, torch.float64, *HALF):
        raise PeftliteError(f"adapter_dtype={dtype!r}: expected torch.float32, torch.float64, torch.bfloat16, "
                            "torch.float16, or None (float32 on 16-bit bases, else the base weight's dtype).")


def adapter_dtype_for(weight: torch.Tensor, dtype) -> torch.dtype:
    """The adapters' dtype: ``dtype`` if given, else float32 on a 16-bit base (as PEFT), else the weight's."""
    if dtype is not None:
        return dtype
    return torch.float32 if weight.dtype in HALF else weight.dtype


class LoRALayer(nn.Module):
    """The part of an adapted module's class that LoRA adds; always first in its bases.

    State, besides the two ``ParameterDict`` children: ``lora_kind`` (the module's kind),
    ``lora_settings`` (name -> :class:`LoRASettings`, every adapter the layer holds),
    ``lora_active`` (the names whose terms the forward adds, in order), ``lora_merge`` (while
    merged: the adapter names folded into the weight and what an exact unmerge needs) and
    ``lora_rows`` (inside ``peftlite.adapter_per_row``: which adapter each row uses).

        y = base(x; W + sum of merged deltas) + sum over active, unmerged n of scaling_n * branch_n(x)
    """

    lora_A: nn.ParameterDict
    lora_B: nn.ParameterDict

    def forward(self, *args, **kwargs):
        if self.lora_rows is not None:
            out = super().forward(*args, **kwargs)
            if not self.lora_rows.names:  # no row uses an adapter of this layer
                return out
            return out + self._rows_term(args[0] if args else next(iter(kwargs.values())), out.dtype)
        merged = () if self.lora_merge is None else self.lora_merge.names
        if merged:
            self._refuse_training_while_merged()
        names = [name for name in self.lora_active if name not in merged]
        if not names:
            return super().forward(*args, **kwargs)
        own_forward = self.lora_kind.merges(type(self).lora_base)  # the kind's known forward
        if own_forward and not merged and len(names) == 1 and len(args) == 1 and not kwargs:
            weight = self.lora_kind.linear_weight(self)
            if weight is not None:
                return self._fused_linear(args[0], weight, names[0])
        out = super().forward(*args, **kwargs)
        x = args[0] if args else next(iter(kwargs.values()))
        for name in names:
            term = self._lora_term(x, out.dtype, name)
            out = out.add_(term) if own_forward else out + term  # a subclass's forward may keep its output
        return out

    def _lora_term(self, x: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
        """``scaling * branch(dropout(x))`` in the base output's dtype (autocast's when it is on); the scaling
        is folded into B, the smallest operand."""
        settings = self.lora_settings[name]
        if x.is_floating_point():
            x = x.to(dtype)
            if self.training and self.lora_kind.takes_dropout and settings.dropout:
                x = F.dropout(x, settings.dropout, training=True)
        lora_B = self.lora_B[name].to(dtype) * settings.scaling
        kind = self.lora_kind
        return kind.expand(self, kind.shrink(self, x, self.lora_A[name].to(dtype)), lora_B)

    def _rows_term(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Each row's own adapter term, in one set of ops for all the layer's adapters (``ops/row_mix.py``):
        gathered per row for Linear-like layers fed many tokens per row, stacked otherwise."""
        rows = self.lora_rows
        if x.is_floating_point():
            x = x.to(dtype)
            if self.training and self.lora_kind.takes_dropout and rows.dropout is not None:
                x = dropout_rows(x, rows.dropout)
        lora_A = [self.lora_A[name] for name in rows.names]
        lora_B = [self.lora_B[name] for name in rows.names]
        scalings = [self.lora_settings[name].scaling for name in rows.names]
        if self.lora_kind in LINEAR_LIKE and tokens_per_row(x, rows) >= GATHER_FROM:
            return gathered_term(x, lora_A, lora_B, scalings, rows)
        return stacked_term(self.lora_kind, self, x, lora_A, lora_B, scalings, rows, dtype)

    def _fused_linear(self, x: torch.Tensor, weight: torch.Tensor, name: str) -> torch.Tensor:
        """``x W^T + b`` plus the low-rank term as one op (``weight`` [out, in], possibly a transposed view);
        adapters cast to the compute dtype."""
        settings = self.lora_settings[name]
        dropout = settings.dropout if self.training else 0.0
        bias, lora_A, lora_B = self.bias, self.lora_A[name], self.lora_B[name]
        device = x.device.type
        if torch.is_autocast_enabled(device):  # a custom Function is not autocast: cast as F.linear would
            dtype = torch.get_autocast_dtype(device)
            with torch.autocast(device, enabled=False):
                return lora_linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype),
                                   lora_A.to(dtype), lora_B.to(dtype), settings.scaling, dropout)
        return lora_linear(x, weight, bias, lora_A.to(x.dtype), lora_B.to(x.dtype), settings.scaling, dropout)

    @property
    def merged(self) -> bool:
        return self.lora_merge is not None

    def reset_lora(self, init: str = "default") -> None:
        """Redraw every adapter's starting values: the layer equals its base again (if unmerged)."""
        if self.merged:
            raise PeftliteError("reset_lora() on a merged layer would lose the merged update; unmerge() first.")
        if init not in INITS:
            raise PeftliteError(f"init={init!r}: expected one of {', '.join(map(repr, INITS))}.")
        with torch.no_grad():
            for name, settings in self.lora_settings.items():
                self.lora_kind.init_(self.lora_A[name], self.lora_B[name], init, settings.rank)

    def delta_weight(self, names=None) -> torch.Tensor:
        """``sum_n scaling_n * delta_n`` over ``names`` (default: the active adapters) in the weight's layout,
        float32 (float64 for float64 weights)."""
        names = list(self.lora_active if names is None else names)
        return self._delta_rows(names)(0, self.weight.shape[0])

    def _delta_rows(self, names: list[str]):
        """``(r0, r1) -> rows r0:r1 of the summed delta`` for :mod:`exact_merge`."""
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        with torch.no_grad():
            parts = [(self.lora_A[n].to(dtype), self.lora_B[n].to(dtype), self.lora_settings[n].scaling)
                     for n in names]

        def rows(r0: int, r1: int) -> torch.Tensor:
            with torch.no_grad():
                total = None
                for lora_A, lora_B, scaling in parts:
                    delta = self.lora_kind.delta_rows(lora_A, lora_B, r0, r1).mul_(scaling)
                    total = delta if total is None else total.add_(delta)
                return total
        return rows

    def merge(self) -> None:
        """Fold the active adapters into ``weight`` in place: ``W <- round(W + delta)``. Idempotent.

        Raises :class:`PeftliteError` (weight unchanged) if the merged weight would hold NaN or Inf.
        """
        if self.merged:
            return
        self.check_mergeable("this layer")
        names = list(self.lora_active)
        if not names:
            return
        if not self.merge_is_finite(names):
            raise PeftliteError(f"merging this {type(self).__name__} gives NaN or Inf weights; nothing was changed. "
                                "Check lora_A/lora_B for NaN/Inf or overflow in the weight's dtype.")
        self.commit_merge(names)

    def check_mergeable(self, where: str) -> None:
        """Raise unless adding the delta to the weight computes what the unmerged forward does."""
        base = type(self).lora_base
        if not self.lora_kind.merges(base):
            raise PeftliteError(f"{where} is a {base.__name__}, a {self.lora_kind.name} subclass with its own forward, "
                                f"so merging into its weight need not equal adding the low-rank term after that "
                                "forward; nothing was changed. Keep it unmerged (its forward is exact), or "
                                "peftlite.unload(model, merge=False).")

    def merge_is_finite(self, names: list[str]) -> bool:
        """Whether merging ``names`` would give a weight free of NaN and Inf (checks, changes nothing)."""
        return exact_merge.merge_is_finite(self.weight.detach(), self._delta_rows(names))

    def commit_merge(self, names: list[str]) -> None:
        """Merge ``names`` without the finiteness check; ``merge(model)`` checks every layer first, then commits."""
        with torch.no_grad():
            residual = exact_merge.merge_exact_(self.weight.detach(), self._delta_rows(names))
        self.lora_merge = MergeState(tuple(names), residual, self._merge_key(names))

    def unmerge(self) -> None:
        """Take the adapters out of ``weight`` again, restoring it bit-exactly. Idempotent."""
        if not self.merged:
            return
        if not self.exactly_unmergeable():
            raise PeftliteError(
                "the weight or an adapter was modified, or the layer was moved to another dtype or device, while "
                "it was merged, so unmerge() can no longer recover the original weight exactly. Reload the base "
                "weights (and the adapter) instead; to change or move an adapter, unmerge first.")
        self.commit_unmerge()

    def commit_unmerge(self) -> None:
        """Unmerge without the check; ``unmerge(model)`` checks every layer first, then commits."""
        with torch.no_grad():
            exact_merge.unmerge_exact_(self.weight.detach(), self._delta_rows(self.lora_merge.names),
                                       self.lora_merge.residual)
        self.lora_merge = None

    def exactly_unmergeable(self) -> bool:
        """False if the weight, an adapter, a dtype or device changed since :meth:`merge` (while merged)."""
        return self._merge_key(self.lora_merge.names) == self.lora_merge.key

    def _merge_key(self, names) -> tuple:
        """What must not change between merge and unmerge for the exact inverse to hold: the weight's and the
        merged adapters' dtypes, devices and contents (checksums, so ``.data`` edits count too), and settings."""
        tensors = [self.weight] + [t for n in names for t in (self.lora_A[n], self.lora_B[n])]
        return (tuple((t.dtype, t.device, tuple(t.shape), exact_merge.fingerprint(t)) for t in tensors),
                tuple((n, self.lora_settings[n]) for n in names))

    def merge_state_bytes(self) -> int:
        """Bytes held to make :meth:`unmerge` exact (0 while unmerged)."""
        return 0 if self.lora_merge is None else self.lora_merge.residual.nbytes()

    def _refuse_training_while_merged(self) -> None:
        if not (self.training and torch.is_grad_enabled()):  # inference: nothing to check
            return
        names = self.lora_merge.names
        if any(p.requires_grad for n in names for p in (self.lora_A[n], self.lora_B[n])):
            raise PeftliteError(
                "forward in training mode on a merged LoRA layer: the adapter would get no gradient. "
                "Call peftlite.unmerge(model) before training, or model.eval() / torch.no_grad() for inference.")

    def __reduce_ex__(self, protocol):
        """Pickle and deepcopy by the original class: generated classes are rebuilt, not looked up by name."""
        return rebuild, (type(self).lora_base,), self.__dict__

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}: rank={s.rank}, alpha={s.alpha:g}, dropout={s.dropout:g}, rslora={s.rslora}"
                             for n, s in self.lora_settings.items())
        merged = list(self.lora_merge.names) if self.merged else []
        return f"{super().extra_repr()}, lora={{{adapters}}}, active={list(self.lora_active)}, merged={merged}"


@dataclass
class MergeState:
    """While merged: which adapters are in the weight, the exact-unmerge residual, the unchanged-state key."""

    names: tuple[str, ...]
    residual: exact_merge.MergeResidual
    key: tuple


class LoRALinear(LoRALayer, nn.Linear):
    """An ``nn.Linear`` with LoRA: ``y = x W^T + b + scaling * (dropout(x) A^T) B^T``, W frozen.

    ``LoRALinear(base, rank=8, alpha=None, dropout=0.0, rslora=False, init="default",
    name="default", adapter_dtype=None)`` adapts ``base`` (an exact ``nn.Linear``) in place and
    returns it: the same object, now of this class, holding its own weight and bias (never a
    copy) plus ``lora_A[name]`` [rank, in] and ``lora_B[name]`` [out, rank]. ``init="default"``
    draws A Kaiming-uniform and zeros B, so the layer starts equal to the base; ``"gaussian"``
    draws A from N(0, 1/rank). Other layer kinds: ``peftlite.inject(model, targets=[...])``.

    >>> layer = LoRALinear(nn.Linear(16, 4), rank=2)
    >>> layer(torch.randn(3, 5, 16)).shape
    torch.Size([3, 5, 4])
    >>> sorted(layer.state_dict())
    ['bias', 'lora_A.default', 'lora_B.default', 'weight']
    """

    def __new__(cls, base: nn.Linear = None, rank: int = 8, alpha=None, dropout: float = 0.0, rslora: bool = False,
                init: str = "default", name: str = "default", adapter_dtype=None):
        if base is None:  # copy.deepcopy and pickle build the object first, then fill in its state
            return super().__new__(cls)
        if isinstance(base, LoRALayer):
            raise PeftliteError("this layer already has LoRA; call peftlite.unload() first to give it a new one.")
        if type(base) is not nn.Linear:
            raise PeftliteError(f"LoRALinear adapts an nn.Linear, got {type(base).__name__}. For other layer kinds "
                                "(Linear subclasses, Conv1D, Embedding, Conv) use peftlite.inject(model, "
                                "targets=[...]).")
        add_lora(base, *plan_lora("LoRALinear", base, name, rank, alpha, dropout, rslora, init, adapter_dtype))
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        return base

    def __init__(self, *args, **kwargs):  # everything happened in __new__; nn.Module.__init__ would reset it
        if "_parameters" not in self.__dict__:  # LoRALayer() / LoRALinear(None): __new__ had no layer to adapt
            raise PeftliteError("LoRALinear(base, rank=...) adapts the nn.Linear it is given; got none. Pass the "
                                "layer: LoRALinear(nn.Linear(16, 4), rank=2).")


def plan_lora(where: str, module: nn.Module, name: str, rank, alpha, dropout, rslora, init, adapter_dtype) -> tuple:
    """Check that ``module`` can take adapter ``name``; return :func:`add_lora`'s arguments. Changes nothing."""
    check_lora_options(rank, alpha, dropout, init, rslora)
    check_adapter_name(name)
    check_adapter_dtype(adapter_dtype)
    kind = require_kind(where, module)
    if module.weight.numel() == 0:
        raise PeftliteError(f"module '{where}' has an empty weight {tuple(module.weight.shape)}: a layer with no "
                            "input or output features has nothing for LoRA to adapt.")
    if isinstance(module, LoRALayer):
        if module.merged:
            raise PeftliteError(f"module '{where}' is merged; call peftlite.unmerge(model) before adding adapters.")
        if name in module.lora_settings:
            raise PeftliteError(f"module '{where}' already has a LoRA adapter named {name!r}; pick another name "
                                "(peftlite.adapter_names(model) lists the taken ones), or remove it first with "
                                "peftlite.delete_adapter(model, name).")
    settings = LoRASettings(rank, float(rank if alpha is None else alpha), float(dropout), rslora)
    return kind, name, settings, init, adapter_dtype_for(module.weight, adapter_dtype)


def add_lora(module: nn.Module, kind: Kind, name: str, settings: LoRASettings, init: str,
             dtype: torch.dtype) -> None:
    """Mutate (after :func:`plan_lora`): give ``module`` adapter ``name``, swapping its class on first use."""
    a_shape, b_shape = kind.shapes(module, settings.rank)
    device = module.weight.device
    lora_A = nn.Parameter(torch.empty(a_shape, device=device, dtype=dtype))
    lora_B = nn.Parameter(torch.empty(b_shape, device=device, dtype=dtype))
    with torch.no_grad():
        kind.init_(lora_A, lora_B, init, settings.rank)
    if not isinstance(module, LoRALayer):
        module.__class__ = lora_class(type(module))
        module.lora_A, module.lora_B = nn.ParameterDict(), nn.ParameterDict()
        module.lora_kind, module.lora_settings, module.lora_merge = kind, {}, None
        module.lora_active, module.lora_rows = (), None
    module.lora_A[name], module.lora_B[name] = lora_A, lora_B
    module.lora_settings[name] = settings
    module.lora_active = (*module.lora_active, name)


def remove_lora(module: LoRALayer, name: str) -> None:
    """Mutate: drop adapter ``name`` (unmerged) from ``module``; the last one gives the module its class back."""
    del module.lora_A[name], module.lora_B[name], module.lora_settings[name]
    module.lora_active = tuple(n for n in module.lora_active if n != name)
    if not module.lora_settings:
        release(module)


def release(module: LoRALayer) -> nn.Module:
    """Give an (unmerged or merged) adapted module its original class and state back; return it.

    The weight keeps whatever it holds now (merged or not): merge or unmerge first.
    """
    for attr in ("lora_A", "lora_B"):
        delattr(module, attr)
    for attr in ("lora_kind", "lora_settings", "lora_merge", "lora_active", "lora_rows"):
        module.__dict__.pop(attr, None)
    module.__class__ = module.__class__.lora_base
    return module


@functools.cache
def lora_class(base: type) -> type:
    """``LoRA<base>``: the class an adapted ``base`` module gets (:class:`LoRALinear` for ``nn.Linear``)."""
    if base is nn.Linear:
        return LoRALinear
    name = f"LoRA{base.__name__}"
    return type(name, (LoRALayer, base), {"__module__": __name__, "__qualname__": name, "lora_base": base})


LoRALinear.lora_base = nn.Linear


def rebuild(base: type) -> LoRALayer:
    """An empty ``LoRA<base>`` object for pickle and deepcopy to fill (see ``LoRALayer.__reduce_ex__``)."""
    cls = lora_class(base)
    return cls.__new__(cls)


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """Every adapted module in ``model`` (the model itself included) by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer)}
