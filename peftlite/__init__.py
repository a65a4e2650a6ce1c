"""peftlite: small, fast, exact parameter-efficient fine-tuning layers for PyTorch."""

from . import hf  # noqa: F401  (registers its events: save_pretrained of adapted transformers models)
from .adapters import (active_adapters, adapter_names, adapter_per_row, delete_adapter, disable_adapters, set_adapter,
                       summary)
from .bottleneck import Adapter
from .combine import combine_adapters
from .errors import PeftliteError
from .export import extract_adapter, merge_checkpoint
from .io import load_adapter, save_adapter
from .lora import LoRALayer, LoRALinear
from .model import inject, merge, unload, unmerge
from .prefix import PrefixEncoder
from .training import check_gradients, enable_input_require_grads

__all__ = ["Adapter", "LoRALayer", "LoRALinear", "PeftliteError", "PrefixEncoder", "active_adapters", "adapter_names",
           "adapter_per_row", "check_gradients", "combine_adapters", "delete_adapter", "disable_adapters",
           "enable_input_require_grads", "extract_adapter", "inject", "load_adapter", "merge", "merge_checkpoint",
           "save_adapter", "set_adapter", "summary", "unload", "unmerge"]
__version__ = "0.1.0"
