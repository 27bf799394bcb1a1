"""Dataset work behind the Dataset tab (gui/datasets.py): caption edits,
imports and the check report."""

from __future__ import annotations

import zipfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from gui import datasets, views
from trainer.errors import UserError


def make_dataset(root: Path, captions: dict[str, str]) -> Path:
    root.mkdir(parents=True)
    for name, caption in captions.items():
        Image.new("RGB", (64, 64), (10, 20, 30)).save(root / f"{name}.png")
        (root / f"{name}.txt").write_text(caption + "\n")
    return root


def captions_of(root: Path) -> dict[str, str]:
    return {p.stem: p.read_text().strip() for p in sorted(root.glob("*.txt"))}


def test_save_caption_writes_one_line_atomically(tmp_path):
    root = make_dataset(tmp_path / "d", {"a": "old"})
    datasets.save_caption(root, "a.png", "new,\n  caption ", ".txt")
    assert (root / "a.txt").read_text() == "new, caption\n"
    assert sorted(p.name for p in root.iterdir()) == ["a.png", "a.txt"]  # no temp file left
    assert datasets.read_caption(root, "a.png", ".txt") == "new, caption"


@pytest.mark.parametrize("rel", ["../outside.png", "/etc/passwd", "missing.png"])
def test_captions_only_for_images_inside_the_folder(tmp_path, rel):
    root = make_dataset(tmp_path / "d", {"a": "x"})
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    with pytest.raises(UserError, match="pick one from the gallery"):
        datasets.save_caption(root, rel, "x", ".txt")
    assert not (tmp_path / "outside.txt").exists()


def test_add_trigger_puts_the_word_first_once(tmp_path):
    root = make_dataset(tmp_path / "d", {"a": "cat, red", "b": "sks, dog", "c": "dog, sks"})
    assert datasets.add_trigger(root, " sks ", ".txt") == 2
    assert captions_of(root) == {"a": "sks, cat, red", "b": "sks, dog", "c": "sks, dog"}
    with pytest.raises(UserError, match="without commas"):
        datasets.add_trigger(root, "a, b", ".txt")


def test_replace_tag_matches_whole_tags_and_can_remove(tmp_path):
    root = make_dataset(tmp_path / "d", {"a": "red cat, red", "b": "blue, red"})
    assert datasets.replace_tag(root, "red", "crimson", ".txt") == 2
    assert captions_of(root) == {"a": "red cat, crimson", "b": "blue, crimson"}
    assert datasets.replace_tag(root, "crimson", "", ".txt") == 2
    assert captions_of(root) == {"a": "red cat", "b": "blue"}


def test_import_zip_skips_names_outside_the_dataset(tmp_path):
    archive = tmp_path / "up.zip"
    image = tmp_path / "x.png"
    Image.new("RGB", (64, 64)).save(image)
    with zipfile.ZipFile(archive, "w") as z:
        z.write(image, "set/1_cat/x.png")
        z.writestr("set/1_cat/x.txt", "a cat")
        z.writestr("../evil.png", "no")
        z.writestr("__MACOSX/._x.png", "no")
        z.writestr("notes.exe", "no")
    target, count = datasets.import_files([str(archive)], tmp_path / "datasets", "mine")
    assert count == 2
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()) == [
        "set/1_cat/x.png", "set/1_cat/x.txt"]
    assert not (tmp_path / "evil.png").exists()
    with pytest.raises(UserError, match="already exists"):
        datasets.import_files([str(archive)], tmp_path / "datasets", "mine")


def test_import_refuses_other_files(tmp_path):
    other = tmp_path / "model.ckpt"
    other.write_bytes(b"x")
    with pytest.raises(UserError, match="not an image, caption or .zip"):
        datasets.import_files([str(other)], tmp_path / "datasets", "mine")


def test_thumbnails_are_cached_and_broken_images_give_none(tmp_path):
    root = make_dataset(tmp_path / "d", {"a": "x"})
    (root / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    thumbs = tmp_path / "thumbs"
    thumbs.mkdir()
    first = datasets.thumbnail(root / "a.png", thumbs)
    assert first is not None and datasets.thumbnail(root / "a.png", thumbs) == first
    assert datasets.thumbnail(root / "bad.png", thumbs) is None


def test_check_reports_broken_images_readably(tmp_path):
    root = tmp_path / "broken"
    root.mkdir()
    for name in ("a.png", "b.jpg"):
        (root / name).write_bytes(b"not an image at all")
    result = datasets.check(str(root), 512, True, 256, 1024, 64, False, ".txt")
    assert result.trainable is False and result.report["errors"] >= 2
    text = views.check_report(result.report, Counter())
    assert text.startswith("### Not trainable:")
    assert "| error | a.png |" in text and "| error | b.jpg |" in text


def test_check_report_shows_buckets_and_tags(tmp_path):
    root = make_dataset(tmp_path / "d", {"a": "sks, cat", "b": "sks, dog"})
    result = datasets.check(str(root), 64, False, 256, 1024, 64, False, ".txt")
    items = datasets.list_images(root)
    text = views.check_report(result.report, datasets.tag_counts(items))
    assert text.startswith("### Trainable: 2 images")
    assert "| 64x64 | 2 | 2 |" in text and "| sks | 2 |" in text and "| cat | 1 |" in text


def test_open_folder_explains_bad_paths(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        datasets.open_folder(str(tmp_path / "nope"))
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        datasets.open_folder(str(tmp_path / "f"))
    with pytest.raises(UserError, match="Enter the path"):
        datasets.open_folder("  ")
