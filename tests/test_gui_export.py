"""Editing an adapter's metadata without torch (gui/safetensors_meta.py):
the file stays a valid safetensors file with the same tensors, and the sshs
hashes in it stay true."""

from __future__ import annotations

import os

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from gui.safetensors_meta import copy_to_folder, read_header, read_metadata, update_metadata
from networks.hashes import legacy_hash, model_hash, tensor_data
from trainer.errors import UserError


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
    with pytest.raises(UserError, match="not an existing folder"):
        copy_to_folder(path, str(tmp_path / "missing"), overwrite=False)
