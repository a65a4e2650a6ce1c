"""TRL: ``SFTTrainer`` and ``DPOTrainer`` for injected models, the DPO reference being the model itself.

TRL's trainers take an injected model as they take any model, and its checkpoints hold the adapter
alone (``peftlite.hf``). Three things TRL does only for PEFT's own model class are done here:

- resuming (and ``load_best_model_at_end``) from adapter-only checkpoints: :class:`peftlite.hf.AdapterCheckpoints`;
- refusing an adapter on the output head: TRL's fused log-probability head multiplies by
  ``lm_head.weight`` directly, so a head adapter would silently take no part in the loss;
- DPO's reference model: TRL recovers it by switching PEFT adapters off, and otherwise loads a second
  copy of the base model by its hub name. :class:`BaseReference` is the first, for peftlite: the policy
  itself inside :func:`peftlite.disable_adapters`, bit for bit the base model, no second copy in memory.

``from peftlite.trl import SFTTrainer, DPOTrainer``: drop-in subclasses of TRL's, built on first use (TRL
is imported only then).
"""

import os

from torch import nn

from .adapters import disable_adapters, prefix_names
from .bottleneck import Adapter
from .errors import PeftliteError
from .hf import AdapterCheckpoints
from .lora import LoRALayer, lora_layers
from .model import adapter_modules, unwrap


def holds_adapters(model) -> bool:
    return isinstance(model, nn.Module) and bool(lora_layers(unwrap(model)) or adapter_modules(unwrap(model))
                                                 or prefix_names(unwrap(model)))


def refuse_peft_config(trainer: str, peft_config) -> None:
    if peft_config is not None:
        raise PeftliteError(f"{trainer}: the model holds peftlite adapters and peft_config="
                            f"{type(peft_config).__name__} asks TRL to wrap it in PEFT's adapters too. Pass one or the "
                            "other: drop peft_config.")


def refuse_adapted_head(trainer: str, model: nn.Module) -> None:
    """TRL scores tokens with ``lm_head.weight`` itself, never calling the head module."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, (LoRALayer, Adapter)):
        raise PeftliteError(f"{trainer}: the output head ({type(head).__name__}) holds an adapter, but TRL computes "
                            "log-probabilities from lm_head.weight directly, so the adapter would take no part in the "
                            "loss and never train. Inject without the head (the default excludes it), or train the "
                            "head whole with inject(..., trainable=['lm_head']).")


class BaseReference(nn.Module):
    """The base model as a reference for TRL: ``reference(**batch)`` is ``policy(**batch)`` inside
    :func:`peftlite.disable_adapters`, so the reference log-probabilities are the frozen base's, exactly,
    from the one copy of the weights.

    The policy is held, not registered as a submodule: what TRL does to a reference model (dropout off,
    device placement) reaches the policy only as TRL does it to the policy. ``forward`` may be replaced
    (TRL patches in its fused head); the call goes to the policy's, which TRL patched the same way.
    ``state_dict`` is the policy's, so TRL's cache of precomputed reference log-probabilities is keyed by
    the actual weights.
    """

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.__dict__["policy"] = policy

    @property
    def config(self):
        return self.policy.config

    def __call__(self, *args, **kwargs):
        with disable_adapters(self.policy):
            return self.policy(*args, **kwargs)

    forward = __call__  # for callers of forward itself, until TRL patches it (the call above stays)

    def state_dict(self, *args, **kwargs):
        return self.policy.state_dict(*args, **kwargs)


def lora_dropouts(model: nn.Module) -> dict[str, float]:
    return {f"{path} ({name})": s.dropout for path, layer in lora_layers(unwrap(model)).items()
            for name, s in layer.lora_settings.items() if s.dropout}


def sharded_training(args) -> bool:
    """FSDP or DeepSpeed, asked for in the config or by ``accelerate launch`` (its environment variables)."""
    launched = any(os.environ.get(f"ACCELERATE_USE_{kind}", "false").lower() in ("1", "true")
                   for kind in ("FSDP", "DEEPSPEED"))
    return launched or (args is not None and bool(args.fsdp or args.deepspeed))


def check_dpo(model: nn.Module, args, ref_model) -> None:
    """What ``DPOTrainer`` needs of an injected model (``args``: its ``DPOConfig``, None for TRL's
    defaults); checks, changes nothing."""
    dropouts = lora_dropouts(model)
    if (args is None or args.disable_dropout) and dropouts:
        where = ", ".join(list(dropouts)[:3]) + (", ..." if len(dropouts) > 3 else "")
        raise PeftliteError(f"DPOTrainer: DPOConfig(disable_dropout=True) switches dropout off, but {len(dropouts)} "
                            f"LoRA adapters have dropout > 0 ({where}), which TRL cannot switch off. Inject with "
                            "dropout=0, or pass DPOConfig(disable_dropout=False) to train with it.")
    if ref_model is not None:
        return
    if prefix_names(unwrap(model)):
        raise PeftliteError("DPOTrainer: the model has a prefix, which cannot be switched off to give the reference "
                            "model. Pass ref_model= (a copy of the base model).")
    if sharded_training(args):
        raise PeftliteError("DPOTrainer: the reference is the policy with its adapters switched off, which is not "
                            "supported under FSDP or DeepSpeed (TRL shards a reference model separately). Pass "
                            "ref_model= (a copy of the base model), or train without them.")


def sft_trainer_class():
    from trl import SFTTrainer as Base

    class SFTTrainer(AdapterCheckpoints, Base):
        """TRL's ``SFTTrainer`` for an injected model: adapter-only checkpoints it resumes from; an adapter on
        the output head (which TRL's fused loss would skip) refused."""

        def __init__(self, model, *args, peft_config=None, **kwargs):
            if holds_adapters(model):
                refuse_peft_config("SFTTrainer", peft_config)
                refuse_adapted_head("SFTTrainer", unwrap(model))
            super().__init__(model, *args, peft_config=peft_config, **kwargs)

    return SFTTrainer


def dpo_trainer_class():
    from trl import DPOTrainer as Base

    class DPOTrainer(AdapterCheckpoints, Base):
        """TRL's ``DPOTrainer`` for an injected model: with no ``ref_model``, the reference is the model with its
        adapters switched off (:class:`BaseReference`); adapter-only checkpoints it resumes from."""

        def __init__(self, model, ref_model=None, args=None, *rest, peft_config=None, **kwargs):
            if holds_adapters(model):
                refuse_peft_config("DPOTrainer", peft_config)
                refuse_adapted_head("DPOTrainer", unwrap(model))
                check_dpo(unwrap(model), args, ref_model)
                if ref_model is None:
                    ref_model = BaseReference(model)
            super().__init__(model, ref_model, args, *rest, peft_config=peft_config, **kwargs)

    return DPOTrainer


BUILDERS = {"SFTTrainer": sft_trainer_class, "DPOTrainer": dpo_trainer_class}


def __getattr__(name: str):
    if name in BUILDERS:  # TRL is imported only when one of its trainers is asked for
        cls = BUILDERS[name]()
        cls.__module__, cls.__qualname__ = __name__, name
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
