"""Scanning folders: kohya repeats and class tokens, captions, header-only reads."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import ImageFile

from core.errors import UserError
from datasets_tools import ScanLimits, ScanStopped, scan_dataset, scan_limits
from tests.datasets_helpers import save_image


def by_rel(result):
    return {item.rel_path: item for item in result.items}


def test_repeats_class_tokens_and_dataset_folders(tmp_path: Path) -> None:
    root = tmp_path / "data"
    save_image(root / "10_sks dog" / "a.png", caption="a dog")
    save_image(root / "10_sks dog" / "more" / "b.png", seed=1, caption="b")
    save_image(root / "plain" / "c.png", seed=2, caption="c")
    save_image(root / "plain" / "3_cat" / "d.png", seed=3, caption="d")
    save_image(root / "top.png", seed=4, caption="top")
    items = by_rel(scan_dataset(root))
    got = {rel: (i.repeats, i.class_token, i.folder) for rel, i in items.items()}
    assert got == {
        "10_sks dog/a.png": (10, "sks dog", "10_sks dog"),
        "10_sks dog/more/b.png": (10, "sks dog", "10_sks dog"),
        "plain/c.png": (1, "plain", "plain"),
        "plain/3_cat/d.png": (3, "cat", "plain/3_cat"),
        "top.png": (1, "data", "data"),
    }
    assert items["top.png"].path == root / "top.png"


def test_root_named_like_a_repeats_folder(tmp_path: Path) -> None:
    save_image(tmp_path / "5_ohwx" / "a.png", caption="x")
    [item] = scan_dataset(tmp_path / "5_ohwx").items
    assert (item.repeats, item.class_token) == (5, "ohwx")


def test_repeats_count_outside_prefixed_folders_and_a_prefix_keeps_its_own(tmp_path: Path
                                                                           ) -> None:
    root = tmp_path / "data"
    save_image(root / "top.png", caption="top")
    save_image(root / "plain" / "deeper" / "a.png", seed=1, caption="a")
    save_image(root / "10_sks" / "b.png", seed=2, caption="b")
    save_image(root / "10_sks" / "more" / "c.png", seed=3, caption="c")
    save_image(root / "plain" / "2_cat" / "d.png", seed=4, caption="d")
    got = {rel: i.repeats for rel, i in by_rel(scan_dataset(root, repeats=3)).items()}
    assert got == {"top.png": 3, "plain/deeper/a.png": 3, "10_sks/b.png": 10,
                   "10_sks/more/c.png": 10, "plain/2_cat/d.png": 2}
    [prefixed_root] = scan_dataset(root / "10_sks" / "more", repeats=3).items
    assert prefixed_root.repeats == 3  # "more" has no prefix; its parent is outside the scan


@pytest.mark.parametrize("repeats", [0, -2])
def test_repeats_below_one_are_refused_naming_the_setting(tmp_path: Path, repeats: int) -> None:
    save_image(tmp_path / "a.png", caption="a")
    with pytest.raises(UserError, match=rf"Repeats = {repeats} .*dataset.repeats.*0_name"):
        scan_dataset(tmp_path, repeats=repeats)


def test_captions_txt_caption_and_configurable_extension(tmp_path: Path) -> None:
    save_image(tmp_path / "a.png", seed=1)
    (tmp_path / "a.txt").write_text("from txt\n", encoding="utf-8")
    (tmp_path / "a.caption").write_text("from caption")
    save_image(tmp_path / "b.jpg", seed=2)
    (tmp_path / "b.caption").write_text("only caption")
    save_image(tmp_path / "C.PNG", seed=3)
    (tmp_path / "C.TXT").write_bytes("\ufeffwith bom, café".encode())
    save_image(tmp_path / "d.webp", seed=4)
    (tmp_path / "d.tags").write_text("from tags")
    items = by_rel(scan_dataset(tmp_path))
    assert {k: v.caption for k, v in items.items()} == {
        "a.png": "from txt", "b.jpg": "only caption", "C.PNG": "with bom, café",
        "d.webp": tmp_path.name}
    assert items["a.png"].caption_path == tmp_path / "a.txt"
    tags = by_rel(scan_dataset(tmp_path, caption_extension="tags"))
    assert {k: v.caption for k, v in tags.items()} == {
        "a.png": "from caption", "b.jpg": "only caption", "C.PNG": tmp_path.name,
        "d.webp": "from tags"}


def test_missing_caption_uses_class_token_with_a_warning(tmp_path: Path) -> None:
    save_image(tmp_path / "4_cat" / "a.png", seed=1, caption="a cat")
    save_image(tmp_path / "4_cat" / "b.png", seed=2)
    save_image(tmp_path / "nocaps" / "c.png", seed=3)
    save_image(tmp_path / "nocaps" / "d.png", seed=4)
    result = scan_dataset(tmp_path)
    assert by_rel(result)["4_cat/b.png"].caption == "cat"
    assert by_rel(result)["nocaps/c.png"].caption == "nocaps"
    assert sorted((p.path, p.reason) for p in result.problems) == [
        ("4_cat/b.png", 'no caption file (b.txt); the class token "cat" is used'),
        ("nocaps", 'no caption files for the 2 images in this folder; '
                   'the class token "nocaps" is used'),
    ]


def test_sizes_come_from_headers_without_decoding(tmp_path: Path, monkeypatch) -> None:
    save_image(tmp_path / "a.jpg", (300, 200))
    save_image(tmp_path / "b.png", (120, 90), seed=1)

    def no_decode(self):  # noqa: ANN001
        raise AssertionError("the scan decoded pixels")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    items = by_rel(scan_dataset(tmp_path))
    assert {k: (v.width, v.height, v.format) for k, v in items.items()} == {
        "a.jpg": (300, 200, "JPEG"), "b.png": (120, 90, "PNG")}


def test_symlink_loop_does_not_recurse_forever(tmp_path: Path) -> None:
    save_image(tmp_path / "sub" / "a.png", caption="a")
    os.symlink(tmp_path, tmp_path / "sub" / "loop")
    assert [i.rel_path for i in scan_dataset(tmp_path).items] == ["sub/a.png"]


@pytest.mark.parametrize("ext", [".png", "", ".", "a/b", "../x", ".tar.gz", "t xt", ".t\x00t",
                                 "x" * 17])
def test_caption_extension_must_be_textual(tmp_path: Path, ext: str) -> None:
    with pytest.raises(UserError, match="short extension of letters and digits|image, model"):
        scan_dataset(tmp_path, caption_extension=ext)


@pytest.mark.parametrize("ext", [".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".onnx",
                                 ".gguf", ".py", "sh", ".bat", ".CMD", ".exe", ".ps1", ".js",
                                 ".toml", ".json", ".yaml", ".yml", ".html", ".jpeg", ".gif"])
def test_caption_extension_of_a_model_script_or_config_is_refused(tmp_path: Path, ext) -> None:
    with pytest.raises(UserError) as raised:
        scan_dataset(tmp_path, caption_extension=ext)
    assert str(raised.value) == (
        f"Caption extension {ext!r} is not usable: it is the extension of an image, model, "
        "script or config file, and caption files are written next to the images with it; "
        "use .txt (kohya's default), .caption or .tags.")


@pytest.mark.parametrize("ext", ["txt", ".caption", ".TAGS", ".wd14_tags", ".cap2"])
def test_usual_caption_extensions_are_accepted(tmp_path: Path, ext: str) -> None:
    save_image(tmp_path / "a.png")
    (tmp_path / f"a.{ext.lstrip('.').lower()}").write_text("the caption")
    [item] = scan_dataset(tmp_path, caption_extension=ext).items
    assert item.caption == "the caption"


def nested(root: Path, depth: int) -> Path:
    folder = root.joinpath(*(f"level{i}" for i in range(1, depth + 1)))
    save_image(folder / "deep.png", caption="deep")
    return folder


def test_a_tree_deeper_than_the_limit_stops_naming_the_folder(tmp_path: Path) -> None:
    nested(tmp_path, 3)
    limits = ScanLimits(max_depth=3)
    assert [i.rel_path for i in scan_dataset(tmp_path, limits=limits).items] == [
        "level1/level2/level3/deep.png"]
    too_deep = nested(tmp_path / "level1", 3)  # 4 levels below the root
    with pytest.raises(ScanStopped) as raised:
        scan_dataset(tmp_path, limits=limits)
    assert str(raised.value) == (
        f"Stopped scanning {tmp_path}: {too_deep} is 4 folder levels below it (the limit is 3). "
        "Point dataset.path at the folder that holds your images (and their caption files or "
        'kohya "N_name" subfolders), not a folder above it; nothing was changed.')


def test_more_entries_than_the_limit_stops(tmp_path: Path) -> None:
    save_image(tmp_path / "a.png", caption="a")
    for i in range(30):  # hidden files count: they are looked at too
        (tmp_path / "junk" / f".{i}").parent.mkdir(exist_ok=True)
        (tmp_path / "junk" / f".{i}").touch()
    assert len(scan_dataset(tmp_path, limits=ScanLimits(max_entries=40)).items) == 1
    with pytest.raises(ScanStopped, match=rf"^Stopped scanning {tmp_path}: it holds more "
                                          r"than 20 files and folders \(the limit\)\."):
        scan_dataset(tmp_path, limits=ScanLimits(max_entries=20))


def test_a_scan_longer_than_the_time_limit_stops(tmp_path: Path, monkeypatch) -> None:
    for i in range(10):
        save_image(tmp_path / f"{i}.png", seed=i)
    clock = iter(range(10_000))  # every look at the clock is one second later
    monkeypatch.setattr(scan_limits, "time", SimpleNamespace(monotonic=lambda: next(clock)))
    with pytest.raises(ScanStopped, match=r"took more than 5 seconds \(the limit; 6 files"):
        scan_dataset(tmp_path, limits=ScanLimits(max_seconds=5))


def test_a_cancel_set_from_another_thread_stops_the_scan(tmp_path: Path, monkeypatch) -> None:
    save_image(tmp_path / "a.png")
    save_image(tmp_path / "b.png", seed=1)
    cancel, reading = threading.Event(), threading.Event()
    from datasets_tools import scan as scan_module

    real_read_header = scan_module.read_header

    def slow_read_header(path):  # noqa: ANN001, ANN202
        reading.set()  # the scan is under way: now the other thread cancels it
        assert cancel.wait(10)
        return real_read_header(path)

    monkeypatch.setattr(scan_module, "read_header", slow_read_header)
    canceller = threading.Thread(target=lambda: reading.wait(10) and cancel.set())
    canceller.start()
    with pytest.raises(ScanStopped) as raised:
        scan_dataset(tmp_path, cancel=cancel)
    canceller.join()
    assert str(raised.value) == (
        f"Scan of {tmp_path} cancelled after 2 files and folders; nothing was changed.")


@pytest.mark.parametrize("folder", ["/", "/etc", "/usr/share", "/proc/self", "/dev", "/home",
                                    "/tmp/"])
def test_the_filesystem_root_and_system_folders_are_refused_at_once(folder: str) -> None:
    started = time.monotonic()
    with pytest.raises(ScanStopped) as raised:
        scan_dataset(folder)
    assert time.monotonic() - started < 1.0
    assert str(raised.value) == (
        f"Refusing to scan {Path(folder).absolute()} as a dataset: it is a system folder or a "
        "whole disk, not a folder of training images. Point dataset.path at the folder that "
        'holds your images (and their caption files or kohya "N_name" subfolders).')


def test_a_link_to_the_root_is_refused_too(tmp_path: Path) -> None:
    os.symlink("/", tmp_path / "everything")
    with pytest.raises(ScanStopped, match="^Refusing to scan .*everything as a dataset"):
        scan_dataset(tmp_path / "everything")


def test_every_public_name_resolves() -> None:
    import datasets_tools

    for name in datasets_tools.__all__:
        assert getattr(datasets_tools, name) is not None
