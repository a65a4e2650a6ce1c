"""Adapter: a bottleneck adapter around any module (Houlsby et al. 2019, arXiv 1902.00751).

Sequential (Houlsby; Pfeiffer et al. 2020 place one per block, after the FFN)::

    h = base(x)
    y = h + scaling * up(act(down(dropout(h))))

Parallel (He et al. 2022, arXiv 2110.04366)::

    y = base(x) + scaling * up(act(down(dropout(x))))

x, h, y: [..., dim]    down: dim -> bottleneck    up: bottleneck -> dim    (both with bias)

Around a convolution (``nn.Conv1d/2d/3d``) the adapter acts on the channel axis of its output
(and input, in parallel mode): ``h`` [B, C, *spatial] is read as [B, *spatial, C].
Parameters: ``2 * dim * bottleneck + bottleneck + dim``, plus 1 (``scaling="learned"``) or
``dim`` (``scaling="channel"``).
"""


import torch
from torch import nn

from .errors import MAX_SCALE, MAX_SIZE, PeftliteError, check_adapter_name, check_positive_int, finite_number
from .ops.row_mix import spread

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "swish": nn.SiLU, "tanh": nn.Tanh,
               "identity": nn.Identity}
MODES = ("sequential", "parallel")
INITS = ("default", "normal")
LEARNED_SCALINGS = ("learned", "channel")
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
SLOT = "adapter"  # the child that holds the bottleneck; the only name the wrapped module gains


def check_adapter_options(dim, bottleneck, reduction_factor, activation, mode, scaling, dropout, init) -> None:
    """Raise :class:`PeftliteError` unless the options describe a usable adapter."""
    for name, value in (("dim", dim), ("bottleneck", bottleneck)):
        if value is not None:
            check_positive_int(name, value, "or None to infer it")
    if not finite_number(reduction_factor) or reduction_factor <= 0:
        raise PeftliteError(f"reduction_factor={reduction_factor!r}: expected a number > 0 (bottleneck = dim // "
                            "reduction_factor; Houlsby and Pfeiffer use 16).")
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise PeftliteError(f"activation={activation!r}: expected one of {', '.join(map(repr, ACTIVATIONS))}.")
    if mode not in MODES:
        raise PeftliteError(f"mode={mode!r}: expected 'sequential' (adapt the module's output) or 'parallel' "
                            "(add an adapter of the module's input to its output).")
    numeric = isinstance(scaling, (int, float)) and not isinstance(scaling, bool)
    if numeric and not finite_number(scaling, MAX_SCALE):
        raise PeftliteError(f"scaling={scaling!r}: expected a finite number of magnitude at most {MAX_SCALE:g} (or "
                            "'learned', 'channel').")
    if not numeric and scaling not in LEARNED_SCALINGS:
        raise PeftliteError(f"scaling={scaling!r}: expected a number, 'learned' (one trainable scalar) or 'channel' "
                            "(one trainable factor per feature).")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise PeftliteError(f"dropout={dropout!r}: expected a probability in [0, 1).")
    if init not in INITS:
        raise PeftliteError(f"init={init!r}: expected 'default' (up projection zero: starts as the base module) "
                            "or 'normal' (N(0, 0.02) weights, zero biases).")


def infer_dim(base: nn.Module, mode: str) -> int | None:
    """The feature size the adapter reads: the base's output size (sequential) or input size (parallel).

    Known from ``out_features``/``in_features`` (Linear), ``embed_dim`` (MultiheadAttention),
    ``normalized_shape`` (LayerNorm), ``hidden_size`` or ``config.hidden_size`` (Hugging Face
    blocks); ``None`` when the module does not say.
    """
    sides = ("out_features", "in_features") if mode == "sequential" else ("in_features", "out_features")
    if isinstance(base, CONVS):
        return base.out_channels if mode == "sequential" else base.in_channels
    if isinstance(base, nn.Linear):
        return getattr(base, sides[0])
    if isinstance(base, nn.MultiheadAttention):
        return base.embed_dim
    if isinstance(base, nn.LayerNorm) and len(base.normalized_shape) == 1:
        return base.normalized_shape[0]
    for source in (base, getattr(base, "config", None)):
        size = getattr(source, "hidden_size", None)
        if isinstance(size, int) and not isinstance(size, bool):
            return size
    return None


class Bottleneck(nn.Module):
    """``scaling * up(act(down(dropout(x))))``: the adapter's own parameters.

    x: [..., dim] -> [..., dim]. ``init="default"``: ``down`` as ``nn.Linear`` draws it, ``up``
    zero (weight and bias), so the output is exactly zero until trained.
    """

    def __init__(self, dim: int, bottleneck: int, activation: str = "relu", scaling=1.0, dropout: float = 0.0,
                 init: str = "default"):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, dim)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.activation, self.init = activation, init
        self.scaling = scaling if scaling in LEARNED_SCALINGS else float(scaling)
        if scaling == "learned":
            self.scale = nn.Parameter(torch.ones(()))
        elif scaling == "channel":
            self.scale = nn.Parameter(torch.ones(dim))
        self.reset(init)

    def reset(self, init: str = "default") -> None:
        with torch.no_grad():
            if init == "normal":
                for linear in (self.down, self.up):
                    nn.init.normal_(linear.weight, std=0.02)
                    nn.init.zeros_(linear.bias)
            else:
                self.down.reset_parameters()
                nn.init.zeros_(self.up.weight)
                nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = self.up(self.act(self.down(self.dropout(x))))  # [..., dim]
        scale = self.scale if isinstance(self.scaling, str) else self.scaling
        return update * scale


class Adapter(nn.Module):
    """A bottleneck adapter around ``base``: ``base``'s output plus a small trainable correction.

    Wraps any module. The wrapper holds the base module's own parameters, buffers and children
    (the same objects, not copies), so every state-dict key and module path of ``base`` is
    unchanged; the adapter adds ``adapter.<name>.down.*``, ``adapter.<name>.up.*`` (and ``.scale``).
    Attributes not found on the wrapper are read from ``base``. Calls go through ``base`` itself,
    so its forward and hooks run as before.

    ``dim``: the feature size adapted; inferred from ``base`` where it says (see :func:`infer_dim`).
    ``bottleneck``: defaults to ``dim // reduction_factor``. A base that returns a tuple (Hugging
    Face layers do) has element 0 adapted and the rest passed through. In ``mode="parallel"`` the
    adapter reads the first positional argument of the call (else the first keyword argument).

    >>> layer = Adapter(nn.Linear(32, 64), reduction_factor=8)   # bottleneck 8
    >>> layer(torch.randn(2, 32)).shape
    torch.Size([2, 64])
    """

    def __init__(self, base: nn.Module, dim: int | None = None, bottleneck: int | None = None,
                 reduction_factor: float = 16, activation: str = "relu", mode: str = "sequential", scaling=1.0,
                 dropout: float = 0.0, init: str = "default", name: str = "default"):
        check_adapter_options(dim, bottleneck, reduction_factor, activation, mode, scaling, dropout, init)
        check_adapter_name(name)
        dim, bottleneck = adapter_sizes(base, dim, bottleneck, reduction_factor, mode)
        super().__init__()
        self.__dict__["base"] = base  # not a child: its children, parameters and buffers are adopted below
        for slot in ("_parameters", "_buffers", "_non_persistent_buffers_set", "_modules"):
            self.__dict__[slot] = base.__dict__[slot]  # shared containers: one truth for both objects
        self.mode, self.dim = mode, dim
        self.training = base.training
        self.adapter = nn.ModuleDict()
        self.adapter_active, self.adapter_rows = (), None
        self.add(name, bottleneck, activation, scaling, dropout, init)

    def add(self, name: str, bottleneck: int, activation: str = "relu", scaling=1.0, dropout: float = 0.0,
            init: str = "default") -> None:
        """Give the wrapper another bottleneck ``name`` (same mode and dim), active from now on."""
        reference = next(iter([*self.base.parameters(), *self.base.buffers()]), None)
        factory = {} if reference is None or not reference.is_floating_point() else \
            {"device": reference.device, "dtype": reference.dtype}
        self.adapter[name] = Bottleneck(self.dim, bottleneck, activation, scaling, dropout, init).to(**factory)
        self.adapter_active = (*self.adapter_active, name)

    def remove(self, name: str) -> None:
        """Drop bottleneck ``name`` (the caller releases the wrapper once none is left)."""
        del self.adapter[name]
        self.adapter_active = tuple(n for n in self.adapter_active if n != name)

    @property
    def bottleneck(self) -> Bottleneck:
        """The adapter's own parameters (state-dict keys ``adapter.<name>.down.weight``, ...) when it holds one."""
        if len(self.adapter) != 1:
            raise PeftliteError(f"this Adapter holds {len(self.adapter)} bottlenecks ({', '.join(self.adapter)}); "
                                "pick one by name: adapter.adapter[name].")
        return next(iter(self.adapter.values()))

    def forward(self, *args, **kwargs):
        out = self.base(*args, **kwargs)
        hidden, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, None)
        if not isinstance(hidden, torch.Tensor):
            raise PeftliteError(f"Adapter: the wrapped {type(self.base).__name__} returned {type(out).__name__}; "
                                "expected a tensor or a tuple whose first element is a tensor.")
        source = hidden if self.mode == "sequential" else first_argument(args, kwargs)
        for what, tensor in (("output", hidden), ("input", source)):
            axis = self.feature_axis(tensor)
            if tensor.ndim == 0 or tensor.shape[axis] != self.dim:
                features = tensor.shape[axis] if tensor.ndim else 0
                raise PeftliteError(f"Adapter(dim={self.dim}) around {type(self.base).__name__}: its {what} has "
                                    f"{features} features on axis {axis} (shape {tuple(tensor.shape)}). Pass "
                                    f"dim={features} (or wrap the module whose features match).")
        if source.shape != hidden.shape:
            raise PeftliteError(f"a parallel Adapter adds a function of the input {tuple(source.shape)} to the output "
                                f"{tuple(hidden.shape)} of the {type(self.base).__name__}; they must have one shape. "
                                "Use mode='sequential'.")
        update = self.update(source)
        adapted = hidden if update is None else hidden + update  # no bottleneck active: the base's output itself
        return adapted if rest is None else (adapted, *rest)

    def update(self, source: torch.Tensor) -> torch.Tensor | None:
        """The sum of the active bottlenecks' outputs (inside ``adapter_per_row``: each row's own one)."""
        axis = self.feature_axis(source)
        features = source.movedim(axis, -1)  # features last for the projections
        rows = self.adapter_rows
        names = self.adapter_active if rows is None else rows.names
        total = None
        for column, name in enumerate(names):
            out = self.adapter[name](features)
            if rows is not None:
                out = torch.where(spread(rows.mask[:, column], out), out, 0)
            total = out if total is None else total + out
        return None if total is None else total.movedim(-1, axis)

    def feature_axis(self, tensor: torch.Tensor) -> int:
        """The axis the adapter reads: the last, or a convolution's channels (1 batched, 0 unbatched)."""
        if isinstance(self.base, CONVS):
            return tensor.ndim - 1 - len(self.base.kernel_size)
        return -1

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("base")
            if base is None:
                raise
            return getattr(base, name)

    def train(self, mode: bool = True):
        super().train(mode)
        self.base.training = mode
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.base._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.base._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def release(self) -> nn.Module:
        """Detach the adapter and return ``base`` as it was before wrapping (the adapter is dropped)."""
        del self._modules[SLOT]
        self.base.train(self.training)
        return self.base

    def extra_repr(self) -> str:
        return f"{type(self.base).__name__}, mode={self.mode!r}, dim={self.dim}, active={list(self.adapter_active)}"


def adapter_sizes(base: nn.Module, dim, bottleneck, reduction_factor, mode) -> tuple[int, int]:
    """Check ``base`` can be wrapped and settle ``(dim, bottleneck)``."""
    if not isinstance(base, nn.Module):
        raise PeftliteError(f"Adapter needs an nn.Module to wrap, got {type(base).__name__}.")
    if isinstance(base, Adapter) or SLOT in base._modules or SLOT in base._parameters:
        raise PeftliteError(f"the {type(base).__name__} already has a child or parameter named '{SLOT}' "
                            "(an adapter?). Call peftlite.unload(model) first, or wrap another module.")
    inferred = infer_dim(base, mode)
    if dim is None and inferred is None:
        raise PeftliteError(f"cannot infer the feature size of a {type(base).__name__}; pass dim=<features of its "
                            f"{'output' if mode == 'sequential' else 'input and output'}>.")
    if dim is not None and inferred is not None and dim != inferred:
        raise PeftliteError(f"dim={dim} does not match the {type(base).__name__}, whose "
                            f"{'output' if mode == 'sequential' else 'input'} has {inferred} features. "
                            f"Pass dim={inferred} or leave it out.")
    dim = dim if dim is not None else inferred
    if isinstance(base, nn.Linear) and mode == "parallel" and base.in_features != base.out_features:
        raise PeftliteError(f"a parallel adapter adds a function of the input to the output, so it needs equal "
                            f"sizes; this Linear maps {base.in_features} -> {base.out_features}. Use "
                            "mode='sequential' or wrap a module whose input and output sizes match.")
    return dim, bottleneck if bottleneck is not None else bottleneck_size(dim, reduction_factor)


def bottleneck_size(dim: int, reduction_factor: float) -> int:
    """``dim // reduction_factor``, checked to be a usable size (1 to MAX_SIZE) before anything is allocated."""
    size = dim // reduction_factor
    if not 1 <= size <= MAX_SIZE:
        raise PeftliteError(f"dim {dim} // reduction_factor {reduction_factor} is {size:g}; the bottleneck needs "
                            f"1 to {MAX_SIZE} features: pass another reduction_factor or bottleneck=<size>.")
    return int(size)


def first_argument(args: tuple, kwargs: dict) -> torch.Tensor:
    """What a parallel adapter reads: the first positional argument, else the first keyword one."""
    source = args[0] if args else next(iter(kwargs.values()), None)
    if not isinstance(source, torch.Tensor):
        raise PeftliteError("a parallel Adapter reads the wrapped module's first argument, which is "
                            f"{type(source).__name__}, not a tensor. Use mode='sequential' for this module.")
    return source
