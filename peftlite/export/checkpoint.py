"""A safetensors checkpoint on disk, read and written one tensor at a time.

A checkpoint is a ``.safetensors`` file, a directory holding ``model.safetensors`` (or exactly one
``*.safetensors`` file), or a sharded set listed by ``model.safetensors.index.json``. Reading parses
the headers only; each tensor is read into its own buffer when it is needed (plain reads, not a
memory map, so resident memory stays bounded by what is being worked on). Output goes to a hidden
temporary folder inside the target directory and is renamed into place only when every file is
complete: an interrupted run leaves nothing that looks like a checkpoint.
"""

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import PeftliteError
from ..io.directory import as_path
from ..io.safetensors_file import Entry, read_header

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
PARTIAL = ".peftlite-partial-"


@dataclass
class Shard:
    path: Path
    entries: list[Entry]
    metadata: dict
    start: int  # where the byte buffer begins


@dataclass
class Checkpoint:
    """``root``: the directory (None for a lone file); ``index``: the shard index, if sharded; ``extra``: the
    directory's other files (config.json, tokenizer files), copied beside an output."""

    root: Path | None
    shards: list[Shard]
    index: dict | None
    extra: list[Path]

    def entries(self) -> dict[str, tuple[Shard, Entry]]:
        return {entry.name: (shard, entry) for shard in self.shards for entry in shard.entries}

    def config(self) -> dict:
        """The directory's ``config.json`` (Hugging Face), or {}."""
        path = None if self.root is None else self.root / "config.json"
        if path is None or not path.is_file():
            return {}
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise PeftliteError(f"{path}: not readable JSON ({err}).") from None
        return config if isinstance(config, dict) else {}


def open_checkpoint(path, what: str = "BASE") -> Checkpoint:
    """Read the headers of the checkpoint at ``path``; raises PeftliteError naming what is wrong."""
    path = as_path(path, what)
    if path.is_file():
        return Checkpoint(None, [read_shard(path)], None, [])
    if not path.is_dir():
        raise PeftliteError(f"{what} {path}: no such file or directory.")
    index_path = path / INDEX
    if index_path.is_file():
        index = read_index(index_path)
        files = list(dict.fromkeys(index["weight_map"].values()))
        shards = [read_shard(path / name) for name in files]
        listed = {name for shard in shards for name in (e.name for e in shard.entries)}
        if listed != set(index["weight_map"]):
            missing = sorted(set(index["weight_map"]) ^ listed)[0]
            raise PeftliteError(f"{index_path}: the index and its shards disagree about tensor '{missing}'.")
        owned = {index_path, *(path / name for name in files)}
    else:
        found = [path / SINGLE] if (path / SINGLE).is_file() else sorted(path.glob("*.safetensors"))
        if len(found) != 1:
            raise PeftliteError(f"{what} {path}: expected {SINGLE}, one .safetensors file or {INDEX}; found "
                                f"{len(found)} .safetensors files.")
        index, shards, owned = None, [read_shard(found[0])], {found[0]}
    extra = sorted(p for p in path.iterdir() if p.is_file() and p not in owned and not p.name.endswith(".bin")
                   and not p.name.startswith("."))
    return Checkpoint(path, shards, index, extra)


def read_index(path: Path) -> dict:
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise PeftliteError(f"{path}: not readable JSON ({err}).") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise PeftliteError(f"{path}: expected a 'weight_map' from tensor names to shard files.")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or Path(shard).name != shard or not shard.endswith(".safetensors"):
            raise PeftliteError(f"{path}: weight_map['{name}'] = {shard!r}: expected a .safetensors file name in "
                                "the same directory.")
    return index


def read_shard(path: Path) -> Shard:
    if path.suffix != ".safetensors":
        raise PeftliteError(f"{path}: expected a .safetensors file (peftlite never unpickles .bin checkpoints).")
    try:
        entries, metadata, start = read_header(path)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise PeftliteError(f"{path}: not a readable safetensors file ({err}).") from None
    return Shard(path, entries, metadata, start)


class Output:
    """The files of a result, written under a temporary folder inside ``directory`` and renamed into place by
    :meth:`commit`; :meth:`abort` removes them. Refuses a non-empty ``directory`` unless ``force``, and any
    directory holding the inputs."""

    def __init__(self, directory, force: bool, inputs: list[Path], what: str = "OUT"):
        directory = as_path(directory, what)
        try:
            resolved = directory.resolve()
            directory.exists()
        except (OSError, RuntimeError) as err:  # a symlink loop: RuntimeError before Python 3.13, OSError after
            raise PeftliteError(f"{what} {directory}: cannot be resolved ({err}); a symlink loop? Pass another "
                                "directory.") from None
        for source in inputs:
            source = source.resolve()
            if resolved == source or resolved == source.parent or resolved in source.parents:
                raise PeftliteError(f"{what} {directory} holds an input ({source}); write the result elsewhere.")
        if directory.exists() and not directory.is_dir():
            raise PeftliteError(f"{what} {directory} is a file; expected a directory to write into.")
        if directory.is_dir() and any(directory.iterdir()) and not force:
            raise PeftliteError(f"{what} {directory} is not empty; pass --force (force=True) to overwrite its files.")
        try:
            directory.mkdir(parents=True, exist_ok=True)
            for stale in directory.glob(PARTIAL + "*"):  # what an interrupted earlier run left
                shutil.rmtree(stale, ignore_errors=True)
            self.temporary = Path(tempfile.mkdtemp(prefix=PARTIAL, dir=directory))
        except OSError as err:
            raise PeftliteError(f"{what} {directory}: cannot write there ({err.strerror or err}).") from None
        self.directory = directory

    def path(self, name: str) -> Path:
        return self.temporary / name

    def commit(self, last: tuple[str, ...] = ()) -> None:
        """Move every file into place, those named in ``last`` (an index, the config) after the others."""
        files = sorted(self.temporary.iterdir(), key=lambda p: (p.name in last, p.name))
        try:
            for path in files:
                os.replace(path, self.directory / path.name)
            self.temporary.rmdir()
        except OSError as err:
            raise PeftliteError(f"{self.directory}: could not move the result into place ({err}).") from None

    def abort(self) -> None:
        shutil.rmtree(self.temporary, ignore_errors=True)
