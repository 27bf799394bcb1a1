"""Dataset work behind the Dataset tab (gui/datasets.py): caption edits and
where they may write, the check report and cancelling it. Uploads are in
test_gui_uploads.py; the same rules through the page, in test_gui_security.py."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from core.errors import UserError
from gui import datasets, views


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


@pytest.mark.parametrize("extension", [".png", "PNG", ".jpg", ".safetensors", ".py", ".sh",
                                       ".toml", "", ".", "../x", ".t/x"])
def test_a_caption_extension_of_another_kind_of_file_is_refused(tmp_path, extension):
    root = make_dataset(tmp_path / "d", {"a": "x"})
    image = (root / "a.png").read_bytes()
    with pytest.raises(UserError, match="Caption extension .* is not usable"):
        datasets.save_caption(root, "a.png", "new", extension)
    assert (root / "a.png").read_bytes() == image
    assert sorted(p.name for p in root.iterdir()) == ["a.png", "a.txt"]


@pytest.mark.parametrize(("make", "why"), [
    (lambda p: p.mkdir(), "it is a link or a folder"),
    (lambda p: p.write_bytes(b"\x00\x01binary\xff"), "it is not a UTF-8 text file"),
    (lambda p: p.write_bytes(b"\xff\xfe not utf-8"), "it is not a UTF-8 text file"),
    (lambda p: p.write_text("tag, " * 20_000), "it is bigger than 64 KB"),
    (lambda p: p.symlink_to(p.parent.parent / "elsewhere.tags"), "it is a link"),
])  # fmt: skip
def test_a_caption_never_replaces_a_file_that_is_not_a_caption(tmp_path, make, why):
    root = make_dataset(tmp_path / "d", {"a": "x"})
    (tmp_path / "elsewhere.tags").write_text("outside")
    target = root / "a.tags"
    make(target)
    before = target.read_bytes() if target.is_file() else None
    for edit in (lambda: datasets.save_caption(root, "a.png", "new", ".tags"),
                 lambda: datasets.read_caption(root, "a.png", ".tags"),
                 lambda: datasets.add_trigger(root, "sks", ".tags")):
        with pytest.raises(UserError, match=f"a.tags is not a caption file \\({why}"):
            edit()
    assert (target.read_bytes() if target.is_file() else None) == before
    assert (tmp_path / "elsewhere.tags").read_text() == "outside"


def test_captions_are_written_only_next_to_images(tmp_path):
    root = make_dataset(tmp_path / "d", {"a": "x"})
    (root / "run.sh").write_text("echo hi")
    with pytest.raises(UserError, match="run.sh is not an image in"):
        datasets.save_caption(root, "run.sh", "x", ".txt")
    assert not (root / "run.txt").exists()


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
    # No usable image at all: refused, with both files listed as skipped.
    assert result.trainable is False and result.report["errors"] == 1
    assert result.report["skipped"] == 2
    text = views.check_report(result.report, Counter())
    assert text.startswith("### Not trainable: 1 error, 0 warnings")
    assert "**2 files skipped** (not trained on)" in text
    assert "| a.png | not an image" in text and "| b.jpg | not an image" in text


def test_check_report_shows_buckets_and_tags(tmp_path):
    root = make_dataset(tmp_path / "d", {"a": "sks, cat", "b": "sks, dog"})
    result = datasets.check(str(root), 64, False, 256, 1024, 64, False, ".txt")
    items = datasets.list_images(root)
    text = views.check_report(result.report, datasets.tag_counts(items))
    assert text.startswith("### Trainable: 2 images")
    assert "| 64x64 | 2 | 2 |" in text and "| sks | 2 |" in text and "| cat | 1 |" in text


@pytest.mark.parametrize("folder", ["/", "/etc", "/usr/lib", "/proc", "~", "/tmp"])
def test_system_folders_and_home_are_not_datasets(folder):
    with pytest.raises(UserError, match="is a system folder, a whole disk or your home folder"):
        datasets.open_folder(folder)


def test_a_running_check_stops_when_cancelled(tmp_path, monkeypatch):
    pid_file = tmp_path / "pid"
    slow = [sys.executable, "-c", "import os, sys, time; open(sys.argv[1], 'w').write("
            "str(os.getpid())); time.sleep(60)", str(pid_file)]
    monkeypatch.setattr(datasets, "python_module", lambda *args: slow)
    cancel = threading.Event()
    threading.Thread(target=lambda: wait_for(pid_file.exists) and cancel.set()).start()
    started = time.monotonic()
    result = datasets.check(str(tmp_path), 512, True, 256, 1024, 64, False, ".txt", cancel)
    assert time.monotonic() - started < 10
    assert result.report is None
    assert result.message == "The dataset check was cancelled; nothing was changed."
    with pytest.raises(ProcessLookupError):  # the child was killed and reaped
        os.kill(int(pid_file.read_text()), 0)


def wait_for(condition, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_open_folder_explains_bad_paths(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        datasets.open_folder(str(tmp_path / "nope"))
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        datasets.open_folder(str(tmp_path / "f"))
    with pytest.raises(UserError, match="Enter the path"):
        datasets.open_folder("  ")
