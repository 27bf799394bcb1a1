"""`check_dataset` and `python -m datasets_tools check`: every broken kind, exact report."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import pytest
from PIL import Image

from datasets_tools import BucketConfig, ScanLimits, ScanStopped, check_dataset
from datasets_tools.cli import main
from tests.datasets_helpers import noise_image, save_image, with_exif_orientation

CONFIG = BucketConfig(resolution=128, step=32, min_side=64, max_side=256)
CLI_BUCKETS = ["--resolution", "128", "--bucket-step", "32", "--min-bucket", "64",
               "--max-bucket", "256"]
REPO = Path(__file__).resolve().parents[1]


def build_broken_dataset(root: Path) -> None:
    cat = root / "10_cat"
    save_image(cat / "good1.png", (160, 128), seed=1, caption="cat, sitting, indoors")
    shutil.copy(cat / "good1.png", cat / "good1_copy.png")
    (cat / "good1_copy.txt").write_text("cat, copy")
    save_image(cat / "good2.jpg", (128, 160), seed=2)
    (cat / "good2.caption").write_text("cat, outdoors")  # .caption is found too
    save_image(cat / "nocap.png", (128, 128), seed=3)
    save_image(cat / "small.png", (96, 96), seed=4, caption="cat")
    save_image(cat / "tiny.png", (16, 16), seed=5, caption="cat")
    (cat / "zero.jpg").write_bytes(b"")
    jpeg = save_image(root / "scratch" / "t.jpg", (128, 128), seed=6).read_bytes()
    (cat / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    png = bytearray(save_image(root / "scratch" / "c.png", (128, 128), seed=7).read_bytes())
    for i in range(len(png) // 2, len(png) // 2 + 64):  # garble compressed pixel data
        png[i] ^= 0x5A
    (cat / "corrupt.png").write_bytes(bytes(png))
    shutil.rmtree(root / "scratch")
    (cat / "notimage.jpg").write_text("this is not an image")
    noise_image((32, 32), 8).save(cat / "anim.gif")
    noise_image((32, 32), 9).save(cat / "gif_inside.png", format="GIF")
    save_image(cat / "latin1.png", (128, 128), seed=10)
    (cat / "latin1.txt").write_bytes("café".encode("latin-1"))
    save_image(cat / "multi.png", (128, 128), seed=11, caption="line one\nline two\n")
    save_image(cat / "emptycap.png", (128, 128), seed=12, caption="")
    (cat / "notes.md").write_text("my notes")
    (cat / "orphan.txt").write_text("no image for me")
    (cat / "._good1.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble junk")  # macOS: ignored
    save_image(root / "1_plain" / "plain.webp", (128, 128), seed=13, caption="plain")
    png = save_image(root / "2_dog" / "whole.png", (128, 128), seed=14).read_bytes()
    (root / "2_dog" / "whole.png").write_bytes(png[: len(png) // 3])
    (root / "empty").mkdir()
    (root / "docs").mkdir()
    (root / "docs" / "readme.md").write_text("read me")
    save_image(root / "0_skip" / "skipped.png", (128, 128), seed=15, caption="x")
    (root / ".git").mkdir()  # hidden folders are not part of the dataset
    (root / ".git" / "junk.png").write_bytes(b"junk")


EXPECTED_PROBLEMS = [
    ("warning", "0_skip", "0 repeats in the folder name: nothing in this folder is used"),
    ("warning", "10_cat", "1 file ignored: neither images nor captions (.md)"),
    ("skipped", "10_cat/anim.gif", "unsupported format .gif (use JPEG, PNG, WebP or BMP)"),
    ("skipped", "10_cat/corrupt.png", "corrupt image (cannot be decoded)"),
    ("warning", "10_cat/emptycap.txt", 'caption file is empty; the class token "cat" is used'),
    ("skipped", "10_cat/gif_inside.png",
     "unsupported format GIF in a .png file (use JPEG, PNG, WebP or BMP)"),
    ("warning", "10_cat/good1_copy.png", "duplicate of 10_cat/good1.png (identical content)"),
    ("skipped", "10_cat/latin1.png",
     "its caption latin1.txt is not UTF-8 (byte 0xe9 at offset 3); save it as UTF-8"),
    ("warning", "10_cat/multi.txt", "caption has 2 lines; only the first is used"),
    ("warning", "10_cat/nocap.png", 'no caption file (nocap.txt); the class token "cat" is used'),
    ("skipped", "10_cat/notimage.jpg", "not an image (the content is not a known image format)"),
    ("warning", "10_cat/orphan.txt", "caption without an image; ignored"),
    ("warning", "10_cat/small.png",
     "too small for resolution 128: 96x96 is enlarged 1.33x to fill 128x128"),
    ("skipped", "10_cat/tiny.png",
     "too small for resolution 128: 16x16 would be enlarged 8.00x to fill 128x128 "
     "(more than 4x); use a larger image or remove it"),
    ("skipped", "10_cat/truncated.jpg", "truncated image (the file ends early)"),
    ("skipped", "10_cat/zero.jpg", "empty file (0 bytes)"),
    ("skipped", "2_dog/whole.png", "truncated image (the file ends early)"),
    ("warning", "2_dog", "no usable image in this folder"),
    ("warning", "docs", "1 file ignored: neither images nor captions (.md)"),
    ("warning", "docs", "no usable image in this folder"),
    ("warning", "empty", "empty folder"),
]


SKIPPED = sorted(path for severity, path, _ in EXPECTED_PROBLEMS if severity == "skipped")


def test_broken_dataset_report_is_exact(tmp_path: Path) -> None:
    build_broken_dataset(tmp_path)
    report = check_dataset(tmp_path, CONFIG)
    got = [(p.severity.value, p.path, p.reason) for p in report.problems]
    assert got == sorted(EXPECTED_PROBLEMS, key=lambda p: (p[1], p[0] != "skipped", p[2]))
    # Every broken file is skipped; the rest trains.
    assert report.trainable and not report.errors
    assert sorted(p.path for p in report.skipped) == SKIPPED
    usable = sorted(item.rel_path for item in report.items)
    assert usable == ["10_cat/emptycap.png", "10_cat/good1.png", "10_cat/good1_copy.png",
                      "10_cat/good2.jpg", "10_cat/multi.png", "10_cat/nocap.png",
                      "10_cat/small.png", "1_plain/plain.webp"]
    assert not set(usable) & set(SKIPPED)
    assert report.buckets is not None and sum(r.images for r in report.buckets.rows) == 8
    text = report.format_text()
    assert "9 files skipped (not trained on):\n  10_cat/anim.gif: unsupported format" in text
    assert text.splitlines()[-1] == (
        "Trainable: 8 images, 71 samples per epoch with repeats, 9 files skipped, 12 warnings.")
    assert all("\n" not in p.reason for p in report.problems)


def test_strict_makes_any_skipped_file_untrainable(tmp_path: Path) -> None:
    build_broken_dataset(tmp_path)
    report = check_dataset(tmp_path, CONFIG, strict=True)
    assert not report.trainable and len(report.skipped) == 9 and not report.errors
    assert report.format_text().splitlines()[-1].startswith(
        "Not trainable with strict checking (--strict, dataset.strict = true): 9 files would "
        "be skipped (listed above).")
    build_valid_dataset(tmp_path / "valid")
    assert check_dataset(tmp_path / "valid", CONFIG, strict=True).trainable


def test_cli_on_broken_dataset_exits_0_listing_the_skipped_files(tmp_path: Path,
                                                                  capsys) -> None:
    build_broken_dataset(tmp_path)
    assert main(["check", str(tmp_path), "--json", *CLI_BUCKETS]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["trainable"] is True and data["images"] == 8
    assert data["errors"] == 0 and data["skipped"] == 9 and data["warnings"] == 12
    assert sorted(p["path"] for p in data["problems"] if p["severity"] == "skipped") == SKIPPED
    assert {"severity", "path", "reason", "code"} <= set(data["problems"][0])
    codes = {p["code"] for p in data["problems"]}
    assert {"corrupt", "truncated", "zero_bytes", "not_an_image", "unsupported_format",
            "too_small", "caption_not_utf8", "duplicate", "empty_folder",
            "folder_without_images"} <= codes
    assert main(["check", str(tmp_path), "--strict", *CLI_BUCKETS]) == 1
    out = capsys.readouterr().out
    assert "9 files skipped (not trained on):" in out
    assert "  2_dog/whole.png: truncated image (the file ends early)" in out


def build_valid_dataset(root: Path) -> None:
    save_image(root / "5_sks" / "a.png", (160, 128), seed=1, caption="sks, a")
    save_image(root / "5_sks" / "b.jpg", (128, 160), seed=2, caption="sks, b")
    save_image(root / "extra" / "c.webp", (256, 128), seed=3, caption="c")
    save_image(root / "extra" / "d.bmp", (128, 128), seed=4)  # missing caption: warning only


def test_valid_dataset_is_trainable_with_warnings(tmp_path: Path, capsys) -> None:
    build_valid_dataset(tmp_path)
    report = check_dataset(tmp_path, CONFIG)
    assert [(p.severity.value, p.path, p.reason) for p in report.problems] == [
        ("warning", "extra/d.bmp", 'no caption file (d.txt); the class token "extra" is used')]
    assert report.trainable
    assert report.samples_per_epoch == 5 + 5 + 1 + 1
    assert report.buckets is not None
    # 2:1 is nearest to 160x96 (5:3) on the log-aspect scale; the rest are near-square.
    assert [(r.size, r.images, r.samples) for r in report.buckets.rows] == [
        ((128, 128), 3, 11), ((160, 96), 1, 1)]
    assert main(["check", str(tmp_path), *CLI_BUCKETS]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == (
        "Trainable: 4 images, 12 samples per epoch with repeats, 1 warning.")


def test_repeats_multiply_unprefixed_images_in_the_report_and_the_cli(tmp_path, capsys) -> None:
    build_valid_dataset(tmp_path)  # 5_sks holds 2 images, extra/ 2 without a prefix
    assert check_dataset(tmp_path, CONFIG, repeats=3).samples_per_epoch == 5 + 5 + 3 + 3
    assert main(["check", str(tmp_path), *CLI_BUCKETS, "--repeats", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["samples_per_epoch"] == 5 + 5 + 4 + 4
    assert main(["check", str(tmp_path), "--repeats", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: Repeats = 0 is not usable")


def test_the_gui_check_passes_dataset_repeats_to_the_cli(tmp_path: Path) -> None:
    from gui.datasets import check

    build_valid_dataset(tmp_path)
    result = check(str(tmp_path), 128, True, 64, 256, 32, False, ".txt", repeats=3)
    assert result.trainable and result.report["samples_per_epoch"] == 5 + 5 + 3 + 3


@pytest.mark.parametrize("args, expected", [
    (["--resolution", "500"], "error: Resolution 500 is not a positive multiple of 8"),
    (["--min-bucket", "1024"], "error: Bucket sides must satisfy"),
    (["--caption-extension", ".png"], "error: Caption extension '.png' is not usable"),
    (["--caption-extension", ".py"], "error: Caption extension '.py' is not usable"),
    (["--max-depth", "-1"], "error: Scan limits must be a depth of 0 or more"),
    (["--max-seconds", "0"], "error: Scan limits must be a depth of 0 or more"),
])
def test_cli_invalid_options_exit_2_without_traceback(tmp_path, capsys, args, expected) -> None:
    assert main(["check", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(expected) and "Traceback" not in err


def test_cli_refuses_the_filesystem_root_and_a_too_deep_tree_with_exit_2(tmp_path) -> None:
    save_image(tmp_path / "a" / "b" / "c.png", (128, 128), caption="c")
    for argv, first_words in ((["check", "/"], "error: Refusing to scan / as a dataset"),
                              (["check", str(tmp_path), "--max-depth", "1"],
                               f"error: Stopped scanning {tmp_path}: {tmp_path / 'a' / 'b'} is 2 "
                               "folder levels below it (the limit is 1).")):
        done = subprocess.run([sys.executable, "-m", "datasets_tools", *argv], cwd=REPO,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2
        assert done.stdout == ""
        assert done.stderr.startswith(first_words) and done.stderr.count("\n") == 1
        assert "dataset.path" in done.stderr


def test_check_dataset_passes_limits_and_cancel_to_the_scan(tmp_path: Path) -> None:
    build_valid_dataset(tmp_path)
    with pytest.raises(ScanStopped, match="more than 2 files and folders"):
        check_dataset(tmp_path, CONFIG, limits=ScanLimits(max_entries=2))
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(ScanStopped, match="cancelled"):
        check_dataset(tmp_path, CONFIG, cancel=cancel)
    assert check_dataset(tmp_path, CONFIG, limits=ScanLimits(max_entries=100)).trainable


def test_cli_missing_folder_exits_1(tmp_path: Path, capsys) -> None:
    assert main(["check", str(tmp_path / "nope")]) == 1
    out = capsys.readouterr().out
    assert f"error    .: dataset folder {tmp_path / 'nope'} does not exist" in out


def test_empty_dataset_is_not_trainable(tmp_path: Path) -> None:
    report = check_dataset(tmp_path, CONFIG)
    assert [(p.severity.value, p.path, p.code) for p in report.problems] == [
        ("error", ".", "no_usable_image")]
    assert not report.trainable


def test_module_entry_point_runs_without_traceback(tmp_path: Path) -> None:
    build_valid_dataset(tmp_path)
    (tmp_path / "extra" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    done = subprocess.run([sys.executable, "-m", "datasets_tools", "check", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr  # one broken file among good ones is skipped
    assert "Traceback" not in done.stderr + done.stdout
    assert "1 file skipped (not trained on):\n  extra/bad.png: " in done.stdout


def test_odd_file_names_stay_on_one_line(tmp_path: Path) -> None:
    name = "bad\nname.jpg"
    (tmp_path / name).write_bytes(b"")
    save_image(tmp_path / "ok.png", (128, 128), seed=1, caption="ok")
    report = check_dataset(tmp_path, CONFIG)
    lines = [line for line in report.format_text().splitlines() if "bad" in line]
    assert lines == ["  bad\\nname.jpg: empty file (0 bytes)"]


def test_exif_rotated_size_is_used_for_the_bucket(tmp_path: Path) -> None:
    with_exif_orientation(tmp_path / "r.jpg", noise_image((256, 128), 1), orientation=6)
    report = check_dataset(tmp_path, CONFIG)
    assert [(i.width, i.height) for i in report.items] == [(128, 256)]
    assert [r.size for r in report.buckets.rows] == [(96, 160)]


def test_decompression_bomb_is_reported_not_raised(tmp_path: Path) -> None:
    # A header that claims a huge image: Pillow's decompression-bomb guard must be reported.
    im = Image.new("L", (1, 1))
    im.save(tmp_path / "x.png")
    data = bytearray((tmp_path / "x.png").read_bytes())
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    (tmp_path / "x.png").write_bytes(bytes(data))
    report = check_dataset(tmp_path, CONFIG)
    assert [(p.path, p.code) for p in report.errors] == [(".", "no_usable_image")]
    assert [(p.path, p.code) for p in report.skipped] == [("x.png", "too_large")]
