"""The one exception peftlite raises for bad input, and the option checks shared by every method."""

import math
import re

from torch import nn

ADAPTER_NAME = re.compile(r"[A-Za-z0-9_\-]+")
# Adapters are kept by name in nn.ModuleDict / nn.ParameterDict containers, whose keys are also module attributes:
# a name that is already an attribute of a container ('forward', 'to', 'training', '_parameters', ...) breaks it.
RESERVED = frozenset(dir(nn.ModuleDict) + dir(nn.ParameterDict) + list(vars(nn.ModuleDict()))
                     + list(vars(nn.ParameterDict())))


class PeftliteError(ValueError):
    """A call was given something peftlite cannot use.

    The message says what was given, what was expected and how to fix it. Any call that raises
    it leaves the model exactly as it was before the call.
    """


MAX_SIZE = 2**16  # ranks, prefix lengths, bottlenecks: far beyond any use, and checked before any allocation


def check_positive_int(name: str, value, hint: str = "", most: int = MAX_SIZE) -> None:
    """Raise unless ``value`` is an int in [1, most] (a bool is not an int here)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise PeftliteError(f"{name}={value!r}: expected an integer from 1 to {most}{f' ({hint})' if hint else ''}.")


def check_probability(name: str, value) -> None:
    """Raise unless ``value`` is a number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise PeftliteError(f"{name}={value!r}: expected a probability in [0, 1). Pass e.g. {name}=0.05, or 0.")


MAX_SCALE = 2.0**24  # alphas, scalings, merge and combine weights: far beyond any use, and finite in float32 products


def finite_number(value, most: float = math.inf) -> bool:
    """Whether ``value`` is an int or float (not a bool), finite, with ``|value| <= most``; an int too large for
    a float is not (rather than an OverflowError)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        value = float(value)
    except OverflowError:
        return False
    return math.isfinite(value) and abs(value) <= most


def check_finite(name: str, value, most: float = math.inf) -> None:
    """Raise unless ``value`` is a finite int or float (not a bool) of magnitude at most ``most``."""
    if not finite_number(value, most):
        raise PeftliteError(f"{name}={value!r}: expected a finite number"
                            f"{f' of magnitude at most {most:g}' if math.isfinite(most) else ''}.")


def check_flag(name: str, value) -> None:
    """Raise unless ``value`` is a bool: a string such as "false" would read as True."""
    if not isinstance(value, bool):
        raise PeftliteError(f"{name}={value!r}: expected True or False.")


def check_adapter_name(name) -> None:
    """Raise unless ``name`` can be an adapter name: one dotted component of state-dict keys."""
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        raise PeftliteError(f"name={name!r}: an adapter name is a non-empty string of letters, digits, '_' and '-' "
                            "(it becomes one component of state-dict keys). Pass e.g. name='default'.")
    if name in RESERVED:
        raise PeftliteError(f"name={name!r} is the name of a torch module attribute or method, which adapters kept "
                            "by name cannot use (it would shadow or break it). Pick another name, e.g. "
                            f"name='{name.strip('_')}_adapter'.")
