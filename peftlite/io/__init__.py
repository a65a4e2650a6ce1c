"""save_adapter / load_adapter: adapters in the Hugging Face PEFT format (safetensors + JSON).

LoRA (``peft_type: LORA``) and prefix tuning (``PREFIX_TUNING``) are read and written as PEFT
does; bottleneck adapters, which PEFT lacks, as ``BOTTLENECK_ADAPTER`` (``bottleneck_format.py``).
The files themselves (atomic writes, strict reads) are ``directory.py``'s; modules saved whole beside
any method, ``saved_modules.py``'s.

Nothing here unpickles: weights are read with safetensors and the config with ``json``.
Loading is strict: a missing or unexpected key, a shape that does not fit, an unreadable file
or an unsupported config raises :class:`PeftliteError` and leaves the model unchanged.
"""

from pathlib import Path

from torch import nn

from . import bottleneck_format, lora_format, prefix_format, saved_modules
from .directory import CONFIG_NAME, WEIGHTS_NAME, as_path, check_same_save, read_config, read_weights, write_adapter
from .. import events
from ..adapters import bottleneck_names, lora_names, prefix_names
from ..errors import PeftliteError, check_adapter_name
from ..fast_path import sync_fast_path_guards
from ..model import (adapter_modules, adapter_parameters, freeze_all_but_adapters, is_adapted, refuse_foreign,
                     refuse_in_context, refuse_meta, require_lora, unwrap)
from ..prefix import attach as prefix_attach
from ..sharding import wait_for_rank_0, writes_here


def check_finite(tensors: dict, source: str, why: str = "the adapter is corrupt or diverged") -> None:
    """Every floating-point value of an adapter must be finite: NaN or Inf would load as a broken adapter.
    One check for what is saved and what is loaded (and merged into a checkpoint)."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
            raise PeftliteError(f"{source}: '{key}' holds NaN or Inf values; {why}.")


def refuse_stale(directory: Path, folders: list[Path]) -> None:
    """Raise if ``directory`` holds adapters that a save writing ``folders`` would leave beside the new ones:
    loading the directory would then give adapters of two saves (Trainer checkpoint folders are not adapters)."""
    if not directory.is_dir():
        return
    held = [directory] if (directory / CONFIG_NAME).is_file() else []
    held += [d for d in sorted(directory.iterdir()) if d.is_dir() and (d / CONFIG_NAME).is_file()
             and not (d / TRAINER_STATE).is_file()]
    stale = [d for d in held if d not in folders]
    if stale:
        names = ", ".join("(root)" if d == directory else repr(d.name) for d in stale)
        raise PeftliteError(f"save_adapter: {directory} already holds adapter(s) {names} from an earlier save that "
                            "this save would not replace, so loading the directory would give adapters of both "
                            "saves; nothing was written. Save into an empty directory, or remove those first.")


KEY_PREFIX = {"LORA": "base_model.model.", bottleneck_format.PEFT_TYPE: "base_model.model.",  # as PEFT writes
              "PREFIX_TUNING": "base_model."}  # the state of modules saved whole (saved_modules.py)
METHODS = ("lora", "adapter", "prefix")
TRAINER_STATE = "trainer_state.json"  # a Hugging Face Trainer checkpoint in an output folder: not an adapter of it


def save_adapter(model: nn.Module, directory, method: str | None = None, name: str | None = None) -> Path:
    """Write the model's adapters (weights and config) to ``directory`` (created if needed), atomically; return it.

    Files: ``adapter_model.safetensors`` and ``adapter_config.json`` per adapter. LoRA and prefix
    tuning are loadable by ``peft.PeftModel.from_pretrained(base_model, directory)`` and by
    :func:`load_adapter`; bottleneck adapters by :func:`load_adapter`. One adapter holds one
    method, as in PEFT. A model with one adapter has it written at the root, whatever its name;
    with several, PEFT's layout: ``default`` at the root, every other name in
    ``<directory>/<name>/``. ``name=`` writes that adapter alone, at the root; ``method=``
    (``"lora" | "adapter" | "prefix"``) keeps adapters of that method only, and is needed for a
    name that two methods share. LoRA is saved as trained, whether or not it is merged; trained
    heads (``inject(trainable=...)``) and leaf modules whose own parameters were made trainable are
    saved whole in every adapter directory, as PEFT's ``modules_to_save``. A reparameterized prefix
    is saved as the table it produces. A wrapped model (DDP, ``torch.compile``) is saved with the
    keys of the bare model. Every payload is built and checked before the first file is written;
    each adapter's directory is then written atomically.
    """
    model = unwrap(model)
    refuse_meta(model, "save_adapter")
    if method is not None and method not in METHODS:
        raise PeftliteError(f"method={method!r}: expected one of {', '.join(map(repr, METHODS))}, or None.")
    held = adapter_methods(model)
    if not held:
        require_lora(model, "save_adapter")
    if name is not None:
        check_adapter_name(name)
        if name not in held:
            raise PeftliteError(f"save_adapter: the model has no adapter named {name!r}; its adapters are "
                                f"{list(held)}.")
        held = {name: held[name]}
    if method is not None:
        held = {n: [m for m in methods if m == method] for n, methods in held.items()}
        held = {n: methods for n, methods in held.items() if methods}
        if not held:
            raise PeftliteError(f"method={method!r}: the model has no such adapter"
                                f"{'' if name is None else f' named {name!r}'}; it has "
                                f"{', '.join(present_methods(model))}.")
    for n, methods in held.items():
        if len(methods) > 1:
            raise PeftliteError(f"adapter {n!r} has {' and '.join(methods)}; a directory holds one method, as in "
                                "PEFT. Save each on its own: save_adapter(model, 'out/lora', method='lora'), ...")
    directory = as_path(directory)
    whole = saved_modules.trained_modules(model)
    writes = []
    for n, (method_n,) in held.items():
        tensors, config = payload(model, method_n, n)
        tensors.update(saved_modules.tensors(whole, KEY_PREFIX[config["peft_type"]]))
        refuse_empty(tensors)
        check_finite(tensors, f"save_adapter: adapter {n!r}", "the run diverged; nothing was written (load_adapter "
                     "would refuse the file). Save an earlier state, or find the step that made it non-finite")
        config["modules_to_save"] = sorted(whole) or None
        folder = directory if len(held) == 1 or n == "default" else directory / n
        writes.append((folder, tensors, config))
    refuse_stale(directory, [folder for folder, _, _ in writes])
    if writes_here(model):  # a sharded model: every rank gathered above, rank 0 writes
        for folder, tensors, config in writes:
            write_adapter(folder, tensors, config)
    wait_for_rank_0(model)
    return directory


def adapter_methods(model: nn.Module) -> dict[str, list[str]]:
    """``{adapter name: its methods}`` in the model's order."""
    found: dict[str, list[str]] = {}
    for method, names in (("lora", lora_names(model)), ("adapter", bottleneck_names(model)),
                          ("prefix", prefix_names(model))):
        for n in names:
            found.setdefault(n, []).append(method)
    return found


def present_methods(model: nn.Module) -> list[str]:
    found = {"lora": bool(lora_format.lora_layers(model)), "adapter": bool(adapter_modules(model)),
             "prefix": prefix_attach.prefix_encoder(model) is not None}
    return [method for method, here in found.items() if here]


def refuse_empty(tensors: dict) -> None:
    """No adapter tensor is empty (rank and features are >= 1): an empty one is a parameter partitioned
    away from this process (DeepSpeed ZeRO-3 leaves each rank an empty ``param.data``)."""
    empty = [key for key, tensor in tensors.items() if tensor.numel() == 0]
    if empty:
        raise PeftliteError(f"save_adapter: {len(empty)} tensors to save are empty ({', '.join(empty[:3])}"
                            f"{', ...' if len(empty) > 3 else ''}): their values are partitioned away from this "
                            "process (DeepSpeed ZeRO-3?). Gather them first (deepspeed.zero.GatheredParameters), or "
                            "pass the gathered full state dict: model.save_pretrained(dir, state_dict=...); nothing "
                            "was written.")


def payload(model: nn.Module, method: str, name: str) -> tuple[dict, dict]:
    if method == "adapter":
        return bottleneck_format.payload(model, name)
    if method == "prefix":
        return prefix_format.payload(model)
    layers = {path: layer for path, layer in lora_format.lora_layers(model).items() if name in layer.lora_settings}
    if "" in layers:
        raise PeftliteError("save_adapter needs a model that contains the LoRA layer, not the layer itself.")
    return lora_format.adapter_tensors(layers, name), lora_format.build_config(model, layers, name)


def load_adapter(model: nn.Module, directory, name: str | None = None) -> nn.Module:
    """Load adapters saved by :func:`save_adapter` or by PEFT (LoRA, prefix tuning) into ``model``, in place.

    ``directory`` holds one adapter (loaded as ``name``, default ``"default"``) or PEFT's
    multi-adapter layout (one at the root, loaded as ``"default"``, and one per subfolder holding an
    ``adapter_config.json``, loaded under the folder's name; Trainer checkpoints, folders holding a
    ``trainer_state.json``, are not adapters of it): ``name=None`` loads them all, a
    ``name`` with its own subfolder loads that one. Loaded adapters join the active set, as
    injected ones do (``set_adapter`` picks).

    LoRA: layers without adapter ``name`` get it with the rank, alpha, rslora and dropout of the
    file (float32 adapters on 16-bit bases). Layers already holding ``name`` are hot-swapped: the
    file must adapt exactly those layers with the same ranks; the values are copied in place
    (a compiled model does not recompile) and, where the file's alpha differs, its scaling is
    folded into B so that the layer's own alpha keeps applying. Every target is checked as
    ``inject`` checks it. Modules in the config's ``modules_to_save`` get the file's values and
    train, as trained heads. Prefix tuning: the model gets ``model.prefix_encoder`` (or, if it has
    one of the same shape, new values). Bottleneck adapters: the named modules are wrapped (or
    refilled). Every file is checked before anything changes. Every other parameter is frozen,
    as by ``inject``. Returns ``model``.
    """
    bare = unwrap(model)
    refuse_in_context(bare, "load_adapter")
    refuse_foreign(bare, "load_adapter")
    if name is not None:
        check_adapter_name(name)
    refuse_meta(bare, "load_adapter")
    directory = as_path(directory)
    changes = [plan_directory(bare, folder, adapter) for adapter, folder in adapter_folders(directory, name)]
    if sum(kind == "PREFIX_TUNING" for kind, _ in changes) > 1:
        raise PeftliteError(f"{directory}: holds several prefix-tuning adapters; one model holds one prefix. "
                            "Load one by name=.")
    held = adapter_parameters(bare, active_only=True)
    flags = {p: p.requires_grad for p in bare.parameters() if id(p) in held}
    for _, change in changes:
        change()
    freeze_all_but_adapters(bare)
    active = adapter_parameters(bare, active_only=True)
    for param, flag in flags.items():  # a hot swap (a Trainer resuming) restores values, not the user's flags
        if id(param) in active:
            param.requires_grad_(flag)
    sync_fast_path_guards(bare, is_adapted)
    events.adapted(bare)
    return model


def adapter_folders(directory: Path, name: str | None) -> list[tuple[str, Path]]:
    """``[(adapter name, folder)]`` that ``load_adapter(model, directory, name)`` reads."""
    if name is not None:
        sub = directory / name
        return [(name, sub if (sub / CONFIG_NAME).is_file() else directory)]
    found = [("default", directory)] if (directory / CONFIG_NAME).is_file() else []
    subfolders = sorted(d for d in directory.iterdir() if d.is_dir() and (d / CONFIG_NAME).is_file()
                        and not (d / TRAINER_STATE).is_file()) if directory.is_dir() else []
    for folder in subfolders:
        try:
            check_adapter_name(folder.name)
        except PeftliteError as err:
            raise PeftliteError(f"{folder}: holds an adapter, but its folder name cannot be an adapter name ({err}) "
                                "Rename the folder, or load it on its own with load_adapter(model, folder, "
                                "name=...).") from None
        if folder.name == "default" and found:
            raise PeftliteError(f"{folder}: a subfolder named 'default' beside an adapter at the root; both would be "
                                "adapter 'default'. Load one by path.")
        found.append((folder.name, folder))
    return found or [("default", directory)]  # reading the missing config raises the usual error


def plan_directory(bare: nn.Module, directory: Path, name: str):
    """Read and check one adapter folder against the model; return ``(peft_type, change)``: the change (a
    callable) loads it. Changes nothing itself."""
    config_path = directory / CONFIG_NAME
    config = read_config(config_path)
    tensors, metadata = read_weights(directory)
    source = str(directory / WEIGHTS_NAME)
    check_finite(tensors, source)
    kind = config.get("peft_type")
    if kind not in ("PREFIX_TUNING", bottleneck_format.PEFT_TYPE):
        lora_format.check_config(config, str(config_path))  # LORA's fields, or names an unsupported peft_type
    heads = saved_modules.listed(bare, config, str(config_path))
    whole, rest = saved_modules.split(tensors, heads, KEY_PREFIX[kind])
    values = saved_modules.plan(bare, heads, whole, source, KEY_PREFIX[kind])
    if kind == "LORA":
        plan = lora_format.plan_load(bare, config, rest, source, name, heads)
        load = lambda: lora_format.apply_load(plan, bare)  # noqa: E731
    else:
        load = (prefix_format if kind == "PREFIX_TUNING" else bottleneck_format).load(bare, config, rest, source,
                                                                                      name)
    check_same_save(directory, config, metadata)

    def change() -> None:
        load()
        saved_modules.apply(bare, values, heads)
    return kind, change
