"""Which modules of a model get adapted: the matching rules behind ``inject(targets=..., exclude=...)``.

A target (or exclude) spec is one of
- ``None``: every ``nn.Linear`` but the output head (see :func:`output_heads`),
- a list of names: a name matches a module whose qualified name equals it or ends with
  ``"." + name`` (``"q_proj"`` matches ``layers.0.attn.q_proj``),
- a string: a regular expression that must fully match the qualified name,
- a callable ``(name, module) -> bool``.
Every list entry, regex or callable must match at least one module, so a typo is an error.
"""

import difflib
import re
from collections.abc import Callable

from torch import nn

from .errors import PeftliteError
from .lora import LoRALinear

HEAD_NAMES = ("lm_head", "head", "classifier", "score")


def name_matches(entry: str, name: str) -> bool:
    """``entry`` names the module ``name`` exactly or as its dotted suffix."""
    return name == entry or name.endswith("." + entry)


def output_heads(model: nn.Module) -> set[str]:
    """Qualified names of the model's output head, which ``targets=None`` leaves alone.

    The module returned by ``model.get_output_embeddings()`` where the model has that method and
    it returns a module; otherwise every ``nn.Linear`` whose own name is one of ``HEAD_NAMES``.
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
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in HEAD_NAMES}


def attention_internals(model: nn.Module) -> set[str]:
    """Linear layers inside ``nn.MultiheadAttention``, which reads their weights directly.

    Its ``out_proj`` is an ``nn.Linear`` whose ``forward`` is never called, so a LoRA wrapper
    there would silently do nothing.
    """
    return {f"{name}.{child}" if name else child
            for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, nn.MultiheadAttention)
            for child, sub in m.named_children() if isinstance(sub, nn.Linear)}


def find_targets(model: nn.Module, targets=None, exclude=None) -> list[str]:
    """Qualified names of the ``nn.Linear`` modules that ``inject`` should wrap, in model order.

    Pure: reads the model, never changes it. Raises :class:`PeftliteError` for a spec that
    matches nothing, or that matches a module LoRA cannot wrap.
    """
    def default(modules):
        skip = output_heads(model) | attention_internals(model)
        return [n for n, m in modules if isinstance(m, nn.Linear) and n not in skip]

    names, modules = select_modules(model, targets, exclude, default)
    if not names:
        raise PeftliteError(no_target_message(targets, exclude, modules))
    internals = attention_internals(model)
    for name in names:
        check_target(name, model.get_submodule(name), internals)
    return names


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


def check_target(name: str, module: nn.Module, internals: set[str]) -> None:
    """Raise unless ``module`` is an ``nn.Linear`` that LoRA can wrap."""
    if isinstance(module, LoRALinear):
        raise PeftliteError(f"module '{name}' already has LoRA. To re-inject, call peftlite.unload(model) first, "
                            "or leave it out of targets.")
    if not isinstance(module, nn.Linear):
        raise PeftliteError(f"module '{name}' is a {type(module).__name__}, expected an nn.Linear. "
                            "Narrow targets to Linear layers (e.g. targets=['q_proj', 'v_proj']).")
    if name in internals:
        raise PeftliteError(f"module '{name}' belongs to an nn.MultiheadAttention, which reads its weight directly, "
                            "so LoRA there would have no effect. Leave it out of targets.")


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
        require_some(spec, spec, what, modules)
        return spec
    if isinstance(spec, (list, tuple, set, frozenset)) and spec and all(isinstance(e, str) for e in spec):
        for entry in spec:
            require_some(lambda name, module, e=entry: name_matches(e, name), entry, what, modules)
        return lambda name, module: any(name_matches(e, name) for e in spec)
    raise PeftliteError(f"{what}={spec!r}: expected a non-empty list of module names, a regular expression string, "
                        "or a callable (name, module) -> bool.")


def require_some(match, shown, what: str, modules: list) -> None:
    if not any(match(name, module) for name, module in modules):
        raise PeftliteError(f"{what} entry {shown!r} matched no module. {closest_names(str(shown), modules)}")


def closest_names(query: str, modules: list) -> str:
    """A hint listing module names that look like ``query``."""
    names = sorted({n.rsplit(".", 1)[-1] for n, _ in modules} | {n for n, _ in modules})
    close = difflib.get_close_matches(query, names, n=5, cutoff=0.5)
    if close:
        return "Modules that look close: " + ", ".join(close) + "."
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules if isinstance(m, nn.Linear)})
    return "Linear modules here are named: " + (", ".join(linear[:12]) or "(none)") + "."


def no_target_message(targets, exclude, modules: list) -> str:
    wrapped = sum(isinstance(m, LoRALinear) for _, m in modules)
    already = f" {wrapped} module(s) already have LoRA." if wrapped else ""
    return (f"targets={targets!r} with exclude={exclude!r} left no nn.Linear to adapt.{already} "
            f"{closest_names(str(targets), modules)}")
