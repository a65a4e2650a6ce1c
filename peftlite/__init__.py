"""peftlite: small, fast, exact parameter-efficient fine-tuning layers for PyTorch."""

from .errors import PeftliteError
from .inject import inject, merge, unload, unmerge
from .io import load_adapter, save_adapter
from .lora import LoRALinear

__all__ = ["LoRALinear", "PeftliteError", "inject", "load_adapter", "merge", "save_adapter", "unload", "unmerge"]
__version__ = "0.1.0"
