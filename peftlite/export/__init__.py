"""Export without the model's code: merge LoRA adapters into a safetensors checkpoint, or extract one from a
fine-tuned checkpoint, streaming tensor by tensor (``peftlite merge`` / ``peftlite extract``)."""

from .extract import extract_adapter
from .merge import merge_checkpoint

__all__ = ["extract_adapter", "merge_checkpoint"]
