"""The one way an integration hooks into the core: callbacks run when a model gains or loses its adapters.

The core (``model``, ``adapters``, ``io``) never imports an integration. An integration that must
act on every adapted model registers here when it is imported; ``peftlite/__init__.py`` imports
the integrations that ship with peftlite, so they are registered for every user of ``import peftlite``.
Today: ``hf.py`` gives an adapted transformers model an adapter-writing ``save_pretrained``.

    adapted(model):  after inject / load_adapter changed ``model`` (the bare module)
    released(model): after unload / delete_adapter left ``model`` without adapters

A callback must be idempotent, must not raise for models it does not handle, and may change only
``model.__dict__`` (instance attributes), never a class or another module.
"""

from collections.abc import Callable

from torch import nn

Callback = Callable[[nn.Module], None]
ADAPTED: list[Callback] = []
RELEASED: list[Callback] = []


def on_adapted(callback: Callback) -> Callback:
    """Register ``callback(model)`` to run after every inject / load_adapter (once per callback)."""
    if callback not in ADAPTED:
        ADAPTED.append(callback)
    return callback


def on_released(callback: Callback) -> Callback:
    """Register ``callback(model)`` to run when a model is left without adapters (once per callback)."""
    if callback not in RELEASED:
        RELEASED.append(callback)
    return callback


def adapted(model: nn.Module) -> None:
    for callback in ADAPTED:
        callback(model)


def released(model: nn.Module) -> None:
    for callback in RELEASED:
        callback(model)
