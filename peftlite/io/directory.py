"""An adapter directory on disk: ``adapter_config.json`` + ``adapter_model.safetensors``, written atomically.

Writing puts both files under temporary names in the target directory, flushes them to disk, and only
then renames them into place, so a save that fails (a full disk, a bad value) leaves the previous
adapter exactly as it was. The weights' metadata carries a checksum of the config
(``peftlite_config_sha256``, over every field but the descriptive ones), so the one mix a crash between
the two renames could leave, or a config copied from another save, is refused on load instead of loading
an adapter that matches neither save. Files without it (PEFT's) load as they are.

Nothing is unpickled: weights are read with safetensors and the config with ``json``.
"""

import hashlib
import json
import os
import struct
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load

from ..errors import PeftliteError
from .safetensors_file import DTYPES, save_file

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
DIGEST = "peftlite_config_sha256"
DESCRIPTIVE = ("base_model_name_or_path", "revision", "task_type", "inference_mode", "peft_version", "auto_mapping")


def as_path(value, what: str = "directory") -> Path:
    """A ``str`` or ``os.PathLike`` (bytes paths included, for non-UTF-8 names on POSIX) as a ``Path``."""
    if isinstance(value, bytes):
        value = os.fsdecode(value)
    if not isinstance(value, (str, os.PathLike)):
        raise PeftliteError(f"{what}={value!r}: expected a path (str or os.PathLike).")
    return Path(value)


def config_digest(config: dict) -> str:
    """sha256 of the config's fields that say what the adapter computes (sorted keys, compact JSON)."""
    relevant = {key: value for key, value in config.items() if key not in DESCRIPTIVE}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_adapter(directory: Path, tensors: dict, config: dict) -> None:
    """Both files, atomically as described above; an OS error becomes a PeftliteError naming the path."""
    unsupported = next((key for key, tensor in tensors.items() if tensor.dtype not in DTYPES), None)
    if unsupported is not None:
        raise PeftliteError(f"save_adapter: '{unsupported}' has dtype {tensors[unsupported].dtype}, which the "
                            f"safetensors files peftlite writes cannot hold ({', '.join(map(str, DTYPES))}).")
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    token = uuid.uuid4().hex[:12]
    temporary = {name: directory / f".{name}.{token}.tmp" for name in (WEIGHTS_NAME, CONFIG_NAME)}
    try:
        directory.mkdir(parents=True, exist_ok=True)
        save_file(tensors, temporary[WEIGHTS_NAME], metadata={"format": "pt", DIGEST: config_digest(config)})
        temporary[CONFIG_NAME].write_text(text)
        for path in temporary.values():
            flush(path)
        for name, path in temporary.items():  # weights first: a crash in between is caught by the checksum
            os.replace(path, directory / name)
    except BaseException as err:  # whatever stopped the save, no temporary file stays behind
        for path in temporary.values():
            if path.parent.is_dir():
                path.unlink(missing_ok=True)
        if not isinstance(err, OSError):
            raise
        raise PeftliteError(f"{directory}: could not write the adapter ({err.strerror or err}); an adapter saved "
                            "there before is unchanged. Check that the path is a writable directory with free "
                            "space.") from None


def flush(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def read_config(path: Path) -> dict:
    if not path.is_file():
        raise PeftliteError(f"{path}: no such file. Point load_adapter at a directory written by save_adapter "
                            "or PEFT's save_pretrained.")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise PeftliteError(f"{path}: not readable JSON ({err}).") from None
    if not isinstance(config, dict):
        raise PeftliteError(f"{path}: expected a JSON object, got {type(config).__name__}.")
    return config


def read_weights(directory: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, metadata)`` of the directory's safetensors file."""
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        pickled = ""
        if (directory / "adapter_model.bin").exists():
            pickled = " adapter_model.bin is a pickle, which peftlite never loads."
        raise PeftliteError(f"{path}: no such file.{pickled} Save the adapter with safetensors "
                            "(PEFT: save_pretrained(..., safe_serialization=True)).")
    try:
        data = path.read_bytes()  # safetensors opens paths as UTF-8 only; bytes work for any file name
        tensors = load(data)  # validates the whole format
        (length,) = struct.unpack("<Q", data[:8])
        metadata = json.loads(data[8: 8 + length]).get("__metadata__") or {}
    except (SafetensorError, OSError, ValueError, RuntimeError, struct.error) as err:
        raise PeftliteError(f"{path}: not a readable safetensors file ({err}).") from None
    return tensors, metadata


def check_same_save(directory: Path, config: dict, metadata: dict) -> None:
    """Refuse a config that is not the one saved with the weights (where the weights say which that was)."""
    saved = metadata.get(DIGEST)
    if saved is not None and saved != config_digest(config):
        raise PeftliteError(f"{directory}: {CONFIG_NAME} is not the config saved with {WEIGHTS_NAME} (a save "
                            "interrupted between its two files, or a config copied or edited since); loading "
                            "them together would give an adapter that matches neither. Save the adapter again.")
