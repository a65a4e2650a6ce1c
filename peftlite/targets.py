"""Which modules of a model get adapted: the matching rules behind ``targets=...`` and ``exclude=...``.

A target (or exclude) spec is one of
- ``None``: for LoRA, every module of a Linear-like kind (``nn.Linear`` and its subclasses,
  transformers' ``Conv1D``) but the output head; Embedding and conv layers only when named,
- a list of names: a name matches a module whose qualified name equals it or ends with
  ``"." + name`` (``"q_proj"`` matches ``layers.0.attn.q_proj``),
- a string: a regular expression that must fully match the qualified name,
- a callable ``(name, module) -> bool``.
Every list entry, regex or callable must match at least one module, so a typo is an error.

Never a target, whatever the spec: peftlite's own modules (a bottleneck's projections, the prefix
encoder's MLP), the projections inside ``nn.MultiheadAttention`` (it never calls them), and modules
inside a trained head (``inject(trainable=...)``), which is saved whole. ``inject`` and
``load_adapter`` check their targets through the same :func:`check_lora_target`.
"""

import difflib
import re
from collections.abc import Callable

from torch import nn

from .bottleneck import Bottleneck
from .errors import PeftliteError
from .kinds import LINEAR_LIKE, Kind, kind_of, require_kind
from .prefix import PrefixEncoder

HEAD_NAMES = ("lm_head", "head", "classifier", "score")


def name_matches(entry: str, name: str) -> bool:
    """``entry`` names the module ``name`` exactly or as its dotted suffix."""
    return name == entry or name.endswith("." + entry)


def output_heads(model: nn.Module) -> set[str]:
    """Qualified names of the model's output head, which ``targets=None`` leaves alone.

    The module returned by ``model.get_output_embeddings()`` where the model has that method and
    it returns a module; otherwise every Linear-like module whose own name is one of ``HEAD_NAMES``.
    """
    getter = getattr(model, "get_output_embeddings", None)
    head = None
    if callable(getter):
        try:
            head = getter()
        except NotImplementedError:
            head = None
    if isinstance(head, nn.Module):
        return {name for name, m in model.named_modules(remove_duplicate=False) if m is head}
    return {name for name, m in model.named_modules(remove_duplicate=False)
            if kind_of(m) in LINEAR_LIKE and name.rsplit(".", 1)[-1] in HEAD_NAMES}


def inside(model: nn.Module, owner: Callable[[str, nn.Module], bool]) -> dict[str, str]:
    """``{name: owner's name}`` for every module strictly below a module that ``owner`` picks."""
    found = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if owner(name, module):
            for sub, _ in module.named_modules(remove_duplicate=False):
                if sub:
                    found[f"{name}.{sub}" if name else sub] = name
    return found


def attention_internals(model: nn.Module) -> set[str]:
    """Modules inside ``nn.MultiheadAttention``, which reads their weights directly (never calls them)."""
    return set(inside(model, lambda name, m: isinstance(m, nn.MultiheadAttention)))


def peftlite_internals(model: nn.Module) -> set[str]:
    """Modules that belong to peftlite itself: inside a bottleneck or a prefix encoder."""
    return set(inside(model, lambda name, m: isinstance(m, (Bottleneck, PrefixEncoder))))


def check_lora_target(name: str, module: nn.Module, protected: dict[str, str]) -> Kind:
    """The kind of the target at ``name``; raises :class:`PeftliteError` unless LoRA there would work.

    ``protected``: ``{name: why}`` for modules that must not get LoRA (see :func:`protected_modules`).
    """
    if name in protected:
        raise PeftliteError(f"module '{name}' {protected[name]}, so it cannot take LoRA. Leave it out of targets.")
    return require_kind(name, module)


def protected_modules(model: nn.Module, trained: set[str] = frozenset()) -> dict[str, str]:
    """``{name: why}`` for every module that LoRA must leave alone; ``trained``: names of trained heads."""
    why = {name: "belongs to an nn.MultiheadAttention, which reads its weight directly (never calls it)"
           for name in attention_internals(model)}
    why.update({name: "belongs to a peftlite module (a bottleneck adapter or the prefix encoder)"
                for name in peftlite_internals(model)})
    heads = inside(model, lambda name, m: name in trained)
    why.update({name: f"is inside '{head}', a trained head that is saved whole" for name, head in heads.items()})
    why.update({name: "is a trained head, saved whole (inject(..., trainable=[]) adapts it instead)"
                for name in trained})
    return why


def find_lora_targets(model: nn.Module, targets=None, exclude=None,
                      trained: set[str] = frozenset()) -> dict[str, Kind]:
    """``{qualified name: kind}`` of the modules LoRA should adapt, in model order.

    Pure: reads the model, never changes it. Raises :class:`PeftliteError` for a spec that
    matches nothing, or that matches a module LoRA cannot adapt.
    """
    protected = protected_modules(model, trained)

    def default(modules):
        skip = output_heads(model) | set(protected)
        return [n for n, m in modules if n not in skip and kind_of(m) in LINEAR_LIKE]

    names, modules = select_modules(model, targets, exclude, default)
    if not names:
        raise PeftliteError(no_target_message(targets, exclude, modules))
    return {name: check_lora_target(name, model.get_submodule(name), protected) for name in names}


def select_modules(model: nn.Module, targets, exclude, default) -> tuple[list[str], list]:
    """``(chosen names in model order, all (name, module) pairs)``; ``default(modules)`` picks for ``targets=None``."""
    modules = [(name, m) for name, m in model.named_modules(remove_duplicate=False) if name]
    if targets is None:
        chosen = set(default(modules))
    else:
        match = spec_matcher(targets, "targets", modules)
        chosen = {n for n, m in modules if match(n, m)}
    if exclude is not None:
        excluded = spec_matcher(exclude, "exclude", modules)
        chosen = {n for n, m in modules if n in chosen and not excluded(n, m)}
    return [n for n, _ in modules if n in chosen], modules


def spec_matcher(spec, what: str, modules: list) -> Callable[[str, nn.Module], bool]:
    """Turn a target/exclude spec into ``(name, module) -> bool``; each part must match something."""
    if isinstance(spec, str):
        try:
            pattern = re.compile(spec)
        except re.error as err:
            raise PeftliteError(f"{what}={spec!r} is not a valid regular expression ({err}).") from None
        match = lambda name, module: pattern.fullmatch(name) is not None  # noqa: E731
        require_some(match, spec, what, modules)
        return match
    if callable(spec):
        match = checked_callable(spec, what)
        require_some(match, spec, what, modules)
        return match
    if isinstance(spec, (list, tuple, set, frozenset)) and spec and all(isinstance(e, str) for e in spec):
        for entry in spec:
            require_some(lambda name, module, e=entry: name_matches(e, name), entry, what, modules)
        return lambda name, module: any(name_matches(e, name) for e in spec)
    raise PeftliteError(f"{what}={spec!r}: expected a non-empty list of module names, a regular expression string, "
                        "or a callable (name, module) -> bool.")


def checked_callable(spec, what: str) -> Callable[[str, nn.Module], bool]:
    """``spec`` called as ``(name, module)``; raising or returning anything but a bool is a PeftliteError
    (a string such as "False" would read as true)."""
    def match(name, module):
        try:
            result = spec(name, module)
        except Exception as err:  # the user's code: report it with its input
            raise PeftliteError(f"{what} callable {spec!r} raised {type(err).__name__}: {err} for module "
                                f"'{name}'.") from err
        if not isinstance(result, bool):
            raise PeftliteError(f"{what} callable {spec!r} returned {result!r} for module '{name}'; expected "
                                "True or False.")
        return result
    return match


def require_some(match, shown, what: str, modules: list) -> None:
    if not any(match(name, module) for name, module in modules):
        raise PeftliteError(f"{what} entry {shown!r} matched no module. {closest_names(str(shown), modules)}")


def closest_names(query: str, modules: list) -> str:
    """A hint listing module names that look like ``query``."""
    names = sorted({n.rsplit(".", 1)[-1] for n, _ in modules} | {n for n, _ in modules})
    close = difflib.get_close_matches(query, names, n=5, cutoff=0.5)
    if close:
        return "Modules that look close: " + ", ".join(close) + "."
    adaptable = sorted({n.rsplit(".", 1)[-1] for n, m in modules if kind_of(m) is not None})
    return "Modules LoRA can adapt here are named: " + (", ".join(adaptable[:12]) or "(none)") + "."


def no_target_message(targets, exclude, modules: list) -> str:
    return (f"targets={targets!r} with exclude={exclude!r} left no layer to adapt (by default: every Linear-like "
            f"layer but the output head). {closest_names(str(targets), modules)}")
