"""Hugging Face transformers: ``save_pretrained`` on an injected model, and a Trainer that resumes from
adapter-only checkpoints.

``inject`` (and ``load_adapter``) give a transformers ``PreTrainedModel`` an instance-level
``save_pretrained`` that writes its adapters, as PEFT's ``PeftModel.save_pretrained`` does (the PEFT
layout: ``adapter_config.json`` + ``adapter_model.safetensors``, several adapters in subfolders). So
``transformers.Trainer`` checkpoints hold the adapter alone, and no ``save_pretrained`` of an injected
model writes a full checkpoint that would reload silently without its adapter; ``peftlite.unload``
gives the class's own ``save_pretrained`` back (the full, merged model). Only the object is changed,
never transformers' classes.

The plain ``transformers.Trainer`` cannot resume from such checkpoints: its ``_load_from_checkpoint``
reads full weights, or adapters only through PEFT's own model class. :class:`Trainer` is the
drop-in subclass that loads them (in place: the optimizer keeps its parameters) and does the same for
``load_best_model_at_end``; :class:`AdapterCheckpoints` gives any other Trainer subclass the same.
"""

import sys
from pathlib import Path

from torch import nn

from . import events
from .io import load_adapter, save_adapter
from .io.directory import CONFIG_NAME
from .sharding import given_values, sharded_model

SLOT = "save_pretrained"


class AdapterSave:
    """``model.save_pretrained(directory, ...)`` for an injected model: ``peftlite.save_adapter``.

    With ``state_dict``, the adapter is written from it, as transformers' ``save_pretrained`` writes the
    state dict it is given (the Trainer under FSDP or DeepSpeed gathers it on every rank, then calls this
    on the main process alone: no collective is started here). Without one, on an FSDP2-sharded model
    every rank takes part (gathering is a collective; rank 0 writes), whatever ``is_main_process`` says.
    """

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, save_directory, *args, is_main_process: bool = True, state_dict=None, **kwargs):
        if state_dict is not None:
            if is_main_process:
                with given_values(self.model, state_dict):
                    save_adapter(self.model, save_directory)
        elif sharded_model(self.model) or is_main_process:
            save_adapter(self.model, save_directory)


def pretrained_class():
    modeling = sys.modules.get("transformers.modeling_utils")
    return None if modeling is None else getattr(modeling, "PreTrainedModel", None)


@events.on_adapted
def guard_save_pretrained(model: nn.Module) -> None:
    """Give a transformers model holding adapters the adapter-writing ``save_pretrained`` (idempotent)."""
    cls = pretrained_class()
    if cls is not None and isinstance(model, cls) and not isinstance(model.__dict__.get(SLOT), AdapterSave):
        model.__dict__[SLOT] = AdapterSave(model)


@events.on_released
def release_save_pretrained(model: nn.Module) -> None:
    if isinstance(model.__dict__.get(SLOT), AdapterSave):
        del model.__dict__[SLOT]


def has_adapter_files(directory) -> bool:
    directory = Path(directory)
    return (directory / CONFIG_NAME).is_file() or any((d / CONFIG_NAME).is_file() for d in directory.iterdir()
                                                      if d.is_dir())


class AdapterCheckpoints:
    """Mixin for any ``transformers.Trainer`` subclass (TRL's ``SFTTrainer``, say): resume and load the best
    model from adapter-only checkpoints. ``class MyTrainer(AdapterCheckpoints, SFTTrainer): pass``."""

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if has_adapter_files(resume_from_checkpoint):
            load_adapter(self.model if model is None else model, resume_from_checkpoint)
            return None
        return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self):
        best = self.state.best_model_checkpoint
        if best is not None and has_adapter_files(best):
            load_adapter(self.model, best)
            return None
        return super()._load_best_model()


def trainer_class():
    from transformers import Trainer as Base

    return type("Trainer", (AdapterCheckpoints, Base), {
        "__module__": __name__, "__qualname__": "Trainer",
        "__doc__": "``transformers.Trainer`` that resumes (and loads the best model) from adapter-only checkpoints."})


def __getattr__(name: str):
    if name == "Trainer":  # transformers is imported only when the Trainer is asked for
        cls = trainer_class()
        globals()["Trainer"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
