"""Scanning folders: kohya repeats and class tokens, captions, header-only reads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import ImageFile

from datasets_tools import scan_dataset
from tests.datasets_helpers import save_image
from trainer.errors import UserError


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


@pytest.mark.parametrize("ext", [".png", "", "."])
def test_caption_extension_must_be_textual(tmp_path: Path, ext: str) -> None:
    with pytest.raises(UserError):
        scan_dataset(tmp_path, caption_extension=ext)


def test_every_public_name_resolves() -> None:
    import datasets_tools

    for name in datasets_tools.__all__:
        assert getattr(datasets_tools, name) is not None
