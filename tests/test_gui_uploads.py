"""Uploads into the datasets folder (gui/uploads.py): zip entries kept inside
the dataset, limits on size, ratio and entry count checked before and while
writing, and nothing left behind by a refused or failed upload."""

from __future__ import annotations

import errno
import os
import struct
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from core.errors import UserError
from gui import uploads


def png(path: Path, seed: int = 0) -> Path:
    Image.effect_noise((32, 32), 40 + seed).convert("RGB").save(path)
    return path


def tree(folder: Path) -> dict[str, bytes]:
    """Every file and folder under `folder` (hidden ones too), with the bytes of files."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"<dir>")
            for p in sorted(folder.rglob("*"))}


@pytest.fixture
def datasets(tmp_path):
    folder = tmp_path / "datasets"
    (folder / "old").mkdir(parents=True)
    (folder / "old" / "kept.txt").write_text("an earlier dataset")
    return folder


def zip_of(path: Path, entries: dict[str, bytes], method=zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", method) as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return path


def test_a_zip_imports_and_names_outside_the_dataset_are_skipped(tmp_path, datasets):
    archive = tmp_path / "up.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(png(tmp_path / "x.png"), "set/1_cat/x.png")
        z.writestr("set/1_cat/x.txt", "a cat")
        z.writestr("../evil.png", "no")
        z.writestr("/abs/evil.png", "no")
        z.writestr("__MACOSX/._x.png", "no")
        z.writestr("set/.hidden.png", "no")
        z.writestr("notes.exe", "no")
    target, count = uploads.import_files([str(archive)], datasets, "mine")
    assert count == 2 and target == datasets / "mine"
    assert sorted(p for p in tree(target) if "." in Path(p).name) == [
        "set/1_cat/x.png", "set/1_cat/x.txt"]
    assert (target / "set/1_cat/x.png").read_bytes() == (tmp_path / "x.png").read_bytes()
    assert not (tmp_path / "evil.png").exists() and not Path("/abs/evil.png").exists()
    assert sorted(p.name for p in datasets.iterdir()) == ["mine", "old"]  # no staging left


def test_uploading_again_refuses_to_overwrite_and_changes_nothing(tmp_path, datasets):
    archive = zip_of(tmp_path / "up.zip", {"a.txt": b"first", "b.txt": b"second"})
    uploads.import_files([str(archive)], datasets, "mine")
    (datasets / "mine" / "a.txt").unlink()  # only b.txt now clashes
    before = tree(datasets)
    with pytest.raises(UserError, match=r"mine/b.txt already exists; upload into a new dataset"):
        uploads.import_files([str(archive)], datasets, "mine")
    assert tree(datasets) == before  # a.txt was not put back half-way


def test_plain_files_go_into_an_existing_dataset(tmp_path, datasets):
    image, caption = png(tmp_path / "y.png"), tmp_path / "y.txt"
    caption.write_text("a caption")
    target, count = uploads.import_files([str(image), str(caption)], datasets, "old")
    assert count == 2
    assert sorted(tree(target)) == ["kept.txt", "y.png", "y.txt"]


def test_other_files_are_refused_before_anything_is_written(tmp_path, datasets):
    other = tmp_path / "model.ckpt"
    other.write_bytes(b"x")
    before = tree(datasets)
    with pytest.raises(UserError, match="model.ckpt: not an image, caption or .zip"):
        uploads.import_files([str(png(tmp_path / "ok.png")), str(other)], datasets, "mine")
    assert tree(datasets) == before


def test_a_file_twice_in_one_upload_is_refused(tmp_path, datasets):
    first = zip_of(tmp_path / "1.zip", {"a.txt": b"one"})
    second = zip_of(tmp_path / "2.zip", {"a.txt": b"two"})
    before = tree(datasets)
    with pytest.raises(UserError, match="a.txt is in the upload twice"):
        uploads.import_files([str(first), str(second)], datasets, "mine")
    assert tree(datasets) == before


@pytest.mark.parametrize(("limits", "entries", "message"), [
    ({"MAX_TOTAL_BYTES": 1500}, {"a.txt": os.urandom(800), "b.txt": os.urandom(800)},
     r"^The upload would take 1\.6 KB unpacked, more than the limit of 1\.5 KB for one upload; "
     r"nothing was written"),
    ({"MAX_ENTRIES": 3}, {f"{i}.txt": b"x" for i in range(5)},
     r"up\.zip holds 5 entries, more than the limit of 3 for one upload"),
    ({"MAX_RATIO": 10, "RATIO_MIN_BYTES": 1000}, {"a.txt": b"\0" * 20_000},
     r"up\.zip: its entry a\.txt expands from \d+ to 20,000 bytes, more than the "
     r"compression ratio limit of 10:1"),
])  # fmt: skip
def test_zip_limits_refuse_and_leave_nothing(tmp_path, datasets, monkeypatch, limits, entries,
                                             message):
    for name, value in limits.items():
        monkeypatch.setattr(uploads, name, value)
    archive = zip_of(tmp_path / "up.zip", entries)
    before = tree(datasets)
    with pytest.raises(UserError, match=message):
        uploads.import_files([str(archive)], datasets, "mine")
    assert tree(datasets) == before


def test_a_zip_bomb_is_refused_at_the_real_limits(tmp_path, datasets):
    # 50 MB of zeros deflates to about 50 KB: a ratio near 1000:1.
    archive = zip_of(tmp_path / "bomb.zip", {"a.png": bytes(50 * 1024**2)})
    before = tree(datasets)
    with pytest.raises(UserError, match=r"compression ratio limit of 200:1 .*zip bomb"):
        uploads.import_files([str(archive)], datasets, "mine")
    assert tree(datasets) == before


def test_many_small_entries_over_the_ratio_as_a_whole_are_refused(tmp_path, datasets,
                                                                  monkeypatch):
    monkeypatch.setattr(uploads, "MAX_RATIO", 10)
    monkeypatch.setattr(uploads, "RATIO_MIN_BYTES", 10_000)
    archive = zip_of(tmp_path / "up.zip", {f"{i}.txt": b"\0" * 5000 for i in range(10)})
    with pytest.raises(UserError, match=r"up\.zip: its content expands from"):
        uploads.import_files([str(archive)], datasets, "mine")


def test_plain_files_over_the_size_limit_are_refused(tmp_path, datasets, monkeypatch):
    monkeypatch.setattr(uploads, "MAX_TOTAL_BYTES", 1000)
    image = png(tmp_path / "big.png")
    assert image.stat().st_size > 1000
    before = tree(datasets)
    with pytest.raises(UserError, match="more than the limit"):
        uploads.import_files([str(image)], datasets, "mine")
    assert tree(datasets) == before


def lie_about_sizes(archive: Path, size: int) -> None:
    """Set every entry's declared uncompressed size to `size` (local and central headers)."""
    data = bytearray(archive.read_bytes())
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        start = data.find(signature)
        while start != -1:
            struct.pack_into("<I", data, start + offset, size)
            start = data.find(signature, start + 4)
    archive.write_bytes(bytes(data))


def test_a_zip_whose_declared_sizes_lie_leaves_nothing(tmp_path, datasets):
    archive = zip_of(tmp_path / "up.zip", {"a.txt": b"fine", "b.txt": os.urandom(5000)})
    lie_about_sizes(archive, 100)
    before = tree(datasets)
    with pytest.raises(UserError, match="cannot be unpacked .*nothing was written"):
        uploads.import_files([str(archive)], datasets, "mine")
    assert tree(datasets) == before


def test_a_disk_full_while_writing_leaves_nothing(tmp_path, datasets, monkeypatch):
    archive = zip_of(tmp_path / "up.zip", {"a.txt": b"one", "b.txt": b"two"})
    real_copy = uploads._Budget.copy

    def copy_then_fill_the_disk(self, source, out, entry):
        if entry.rel.name == "b.txt":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_copy(self, source, out, entry)

    monkeypatch.setattr(uploads._Budget, "copy", copy_then_fill_the_disk)
    before = tree(datasets)
    with pytest.raises(UserError, match=r"failed \(No space left on device\); nothing of it"):
        uploads.import_files([str(archive)], datasets, "mine")
    assert tree(datasets) == before


def test_staging_left_by_a_killed_app_is_removed(tmp_path, datasets):
    stale = datasets / f"{uploads.STAGING_PREFIX}999999999-dead"
    (stale / "half").mkdir(parents=True)
    (stale / "half" / "a.png").write_bytes(b"half an image")
    ours = datasets / f"{uploads.STAGING_PREFIX}{os.getpid()}-running"  # an upload under way
    ours.mkdir()
    uploads.import_files([str(zip_of(tmp_path / "up.zip", {"a.txt": b"x"}))], datasets, "mine")
    assert not stale.exists() and ours.exists()


def test_a_zip_without_images_or_captions_makes_no_dataset(tmp_path, datasets):
    archive = zip_of(tmp_path / "up.zip", {"../evil.png": b"x", "notes.exe": b"x"})
    before = tree(datasets)
    with pytest.raises(UserError, match="holds no images or captions"):
        uploads.import_files([str(archive)], datasets, "mine")
    assert tree(datasets) == before
