"""peftlite: small, fast, exact parameter-efficient fine-tuning layers for PyTorch."""

from .bottleneck import Adapter
from .errors import PeftliteError
from .io import load_adapter, save_adapter
from .lora import LoRALayer, LoRALinear
from .model import inject, merge, unload, unmerge
from .prefix import PrefixEncoder

__all__ = ["Adapter", "LoRALayer", "LoRALinear", "PeftliteError", "PrefixEncoder", "inject", "load_adapter", "merge",
           "save_adapter", "unload", "unmerge"]
__version__ = "0.1.0"
