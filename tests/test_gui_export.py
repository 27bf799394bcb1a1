"""Editing an adapter's metadata without torch (gui/safetensors_meta.py):
the file stays a valid safetensors file with the same tensors, and the sshs
hashes in it stay true. Only adapter files are copied or served (gui/exports.py)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from core.errors import UserError
from gui.datadir import DataDirs
from gui.exports import copy_to_folder, download, servable
from gui.paths import copy_target
from gui.safetensors_meta import adapter_problem, read_header, read_metadata, update_metadata
from networks.hashes import legacy_hash, model_hash, tensor_data


@pytest.fixture
def adapter(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"lora_unet_x.lora_down.weight": rng.standard_normal((4, 320)).astype(np.float16),
               "lora_unet_x.alpha": np.array(4.0, dtype=np.float16)}
    path = tmp_path / "a.safetensors"
    save_file(tensors, path, metadata={"modelspec.title": "old", "ss_network_dim": "4"})
    data = tensor_data(path.read_bytes())
    update = {"sshs_model_hash": model_hash(data), "sshs_legacy_hash": legacy_hash(data)}
    update_metadata(path, update)
    return path, tensors


@pytest.mark.parametrize("title", ["new title", "ünïcode ✓ " * 50, "a"])
def test_metadata_edit_keeps_tensors_and_hashes(adapter, title):
    path, tensors = adapter
    before = tensor_data(path.read_bytes()).tobytes()
    update_metadata(path, {"modelspec.title": title, "modelspec.trigger_phrase": "sks",
                           "modelspec.description": ""})
    meta = read_metadata(path)
    assert meta["modelspec.title"] == title and meta["modelspec.trigger_phrase"] == "sks"
    assert "modelspec.description" not in meta and meta["ss_network_dim"] == "4"
    after = tensor_data(path.read_bytes())
    assert after.tobytes() == before
    assert meta["sshs_model_hash"] == model_hash(after)
    assert meta["sshs_legacy_hash"] == legacy_hash(after)
    loaded = load_file(path)  # the safetensors library itself reads it
    assert all(np.array_equal(loaded[k], v) for k, v in tensors.items())
    with safe_open(path, "np") as opened:
        assert opened.metadata()["modelspec.title"] == title
    assert read_header(path)[1] % 8 == 0  # the data stays 8-byte aligned
    assert [p.name for p in path.parent.iterdir()] == ["a.safetensors"]  # no temp file left


def test_not_a_safetensors_file_is_explained(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(UserError, match="not a .safetensors file"):
        update_metadata(path, {"modelspec.title": "x"})
    path.write_bytes(b"abc")
    with pytest.raises(UserError, match="too short"):
        read_metadata(path)


def test_copy_to_folder_refuses_to_overwrite_unless_asked(adapter, tmp_path):
    path, _ = adapter
    lora_dir = tmp_path / "webui" / "models" / "Lora"
    lora_dir.mkdir(parents=True)
    target = copy_to_folder(path, str(lora_dir), overwrite=False)
    assert target.read_bytes() == path.read_bytes()
    assert oct(os.stat(target).st_mode & 0o777) == "0o644"
    with pytest.raises(UserError, match="tick 'Overwrite'"):
        copy_to_folder(path, str(lora_dir), overwrite=False)
    copy_to_folder(path, str(lora_dir), overwrite=True)
    with pytest.raises(UserError, match="missing does not exist; enter the path of an existing "
                                        "folder"):
        copy_to_folder(path, str(tmp_path / "missing"), overwrite=False)
    assert not (tmp_path / "missing").exists()


def base_model(path):
    save_file({"model.diffusion_model.input_blocks.0.0.weight": np.zeros((4, 4), np.float16)},
              path)
    return path


@pytest.mark.parametrize(("make", "why"), [
    (lambda p: base_model(p), "its tensor 'model.diffusion_model.input_blocks.0.0.weight' is "
                              "not a LoRA/LyCORIS tensor name"),
    (lambda p: p.write_text("root:x:0:0:root:/root:/bin/bash\n"), "it is not a .safetensors file"),
    (lambda p: save_file({}, p), "it holds no tensors"),
    (lambda p: p.mkdir(), "it cannot be read: Is a directory"),
])  # fmt: skip
def test_only_adapter_files_count_as_adapters(tmp_path, adapter, make, why):
    assert adapter_problem(adapter[0]) is None
    path = tmp_path / "other.safetensors"
    make(path)
    assert why in adapter_problem(path)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(adapter[0].read_bytes()[:-2])
    assert "the header describes" in adapter_problem(truncated)


def test_copy_copies_only_adapters_and_never_replaces_another_file(adapter, tmp_path):
    path, _ = adapter
    lora_dir = tmp_path / "Lora"
    lora_dir.mkdir()
    model = base_model(tmp_path / "model.safetensors")
    with pytest.raises(UserError, match="is not a LoRA/LyCORIS adapter file"):
        copy_to_folder(str(model), str(lora_dir), overwrite=True)
    other = lora_dir / path.name
    other.write_bytes(b"someone else's file")
    with pytest.raises(UserError, match="exists and is not an adapter file; it is never "
                                        "replaced, even with 'Overwrite'"):
        copy_to_folder(str(path), str(lora_dir), overwrite=True)
    assert other.read_bytes() == b"someone else's file"
    assert sorted(p.name for p in lora_dir.iterdir()) == [path.name]  # no temp file left


@pytest.mark.parametrize("folder", ["/", "/etc", "/usr/share", "/var", "/proc", "~", "/tmp"])
def test_copy_refuses_system_folders(adapter, tmp_path, monkeypatch, folder):
    monkeypatch.setenv("HOME", str(tmp_path))
    before = sorted(tmp_path.iterdir())
    # copy_target decides and writes nothing: a broken rule must not write into /etc.
    with pytest.raises(UserError, match="is a system folder, a whole disk or your home folder"):
        copy_target(adapter[0], folder, overwrite=True)
    if folder in ("/proc", "~"):  # unwritable, or the fake home: safe to try the copy itself
        with pytest.raises(UserError, match="is a system folder"):
            copy_to_folder(str(adapter[0]), folder, overwrite=True)
    assert sorted(tmp_path.iterdir()) == before


def test_servable_hands_out_adapters_only_and_copies_nothing_else(adapter, tmp_path,
                                                                  monkeypatch):
    path, _ = adapter
    dirs = DataDirs(tmp_path / "data").create()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    model = base_model(elsewhere / "model.safetensors")
    secret = elsewhere / "secret.txt"
    secret.write_text("secret")
    monkeypatch.chdir(elsewhere)  # Gradio serves what a handler returns from here, too
    for other in (model, secret):
        with pytest.raises(UserError, match="is not a LoRA/LyCORIS adapter file"):
            download(str(other), dirs)
        with pytest.raises(UserError, match="only adapter files and previews are served"):
            servable(other, dirs)
    assert not (dirs.root / "served").exists()
    assert download(str(path), dirs) == path  # in the temp folder: Gradio serves it as is
