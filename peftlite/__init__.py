"""peftlite: small, fast, exact parameter-efficient fine-tuning layers for PyTorch."""

from .adapter import Adapter
from .errors import PeftliteError
from .inject import inject, merge, unload, unmerge
from .io import load_adapter, save_adapter
from .lora import LoRALinear
from .prefix import PrefixEncoder

__all__ = ["Adapter", "LoRALinear", "PeftliteError", "PrefixEncoder", "inject", "load_adapter", "merge",
           "save_adapter", "unload", "unmerge"]
__version__ = "0.1.0"
