"""Saving is atomic and a directory holds one save: a failed save keeps the previous adapter, a config from another
save is refused, filesystem errors are PeftliteErrors naming the path, and any path type works."""

import json
import os
import shutil

import pytest
import torch

import peftlite
from peftlite import PeftliteError
from peftlite.io import directory as adapter_directory
from tests.models import TinyMLP, assert_load_refused, randomize_lora

X = torch.randn(3, 12, generator=torch.Generator().manual_seed(0))


def base():
    torch.manual_seed(0)
    return TinyMLP()


def trained(alpha=4, seed=1):
    model = peftlite.inject(base(), rank=2, alpha=alpha)
    randomize_lora(model, seed=seed)
    return model.eval()


def test_a_failing_save_leaves_the_previous_adapter_intact(tmp_path, monkeypatch):
    first = trained()
    peftlite.save_adapter(first, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(adapter_directory, "flush", full_disk)  # both files written, not yet in place
    with pytest.raises(PeftliteError, match=r"could not write the adapter \(No space left on device\); an adapter "
                                            "saved there before is unchanged"):
        peftlite.save_adapter(trained(alpha=8, seed=2), tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporary file left either
    monkeypatch.undo()
    torch.testing.assert_close(peftlite.load_adapter(base(), tmp_path).eval()(X), first(X), rtol=0, atol=0)


def test_a_config_from_another_save_is_refused(tmp_path):
    peftlite.save_adapter(trained(alpha=4), tmp_path / "a")
    peftlite.save_adapter(trained(alpha=8), tmp_path / "b")
    shutil.copy(tmp_path / "b" / "adapter_config.json", tmp_path / "a" / "adapter_config.json")
    assert_load_refused(TinyMLP(), tmp_path / "a", "adapter_config.json is not the config saved with "
                                                   "adapter_model.safetensors")


def test_descriptive_config_edits_still_load(tmp_path):
    model = trained()
    peftlite.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "base_model_name_or_path": "my/model",
                                "inference_mode": False}))
    torch.testing.assert_close(peftlite.load_adapter(base(), tmp_path).eval()(X), model(X), rtol=0, atol=0)


def test_a_path_that_cannot_be_a_directory_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(PeftliteError, match="file/adapter: could not write the adapter"):
        peftlite.save_adapter(trained(), tmp_path / "file" / "adapter")
    with pytest.raises(PeftliteError, match="could not write the adapter"):
        peftlite.save_adapter(trained(), tmp_path / "file")


@pytest.mark.parametrize("kind", ["str", "pathlike", "bytes"])
def test_every_path_type_and_non_utf8_names(tmp_path, kind):
    model = trained()
    raw = os.fsencode(tmp_path) + b"/adapter-\xff\xfe"  # not valid UTF-8: POSIX allows it
    target = {"str": os.fsdecode(raw), "pathlike": tmp_path / os.fsdecode(raw).rsplit("/", 1)[1], "bytes": raw}[kind]
    peftlite.save_adapter(model, target)
    torch.testing.assert_close(peftlite.load_adapter(base(), target).eval()(X), model(X), rtol=0, atol=0)


def test_a_trained_head_in_a_dtype_the_file_cannot_hold_is_refused_before_writing(tmp_path):
    model = peftlite.inject(base(), rank=2, targets=["fc1"], trainable=["norm"])
    model.norm.register_buffer("counter", torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(PeftliteError, match="'base_model.model.norm.counter' has dtype torch.complex64"):
        peftlite.save_adapter(model, tmp_path)
    assert not any(tmp_path.iterdir())
