"""A real-world folder trains as it is: a file that cannot be used is skipped
and listed (the check, the trainer's log, the GUI report); only a dataset
without a usable image, or `dataset.strict = true`, is refused."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import zlib
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from core.errors import UserError
from tests.datasets_helpers import noise_image, save_image
from trainer.config import load_config

REPO = Path(__file__).resolve().parents[1]
GOOD = ["good/a.png", "good/b.jpg", "good/c.webp"]
# Every kind of per-file problem, with the reason the report gives for it.
BROKEN = {
    "bad/anim.gif": "unsupported format .gif (use JPEG, PNG, WebP or BMP)",
    "bad/bomb.png": "image too large to decode safely (over Pillow's pixel limit)",
    "bad/corrupt.png": "corrupt image (cannot be decoded)",
    "bad/gif_inside.png": "unsupported format GIF in a .png file (use JPEG, PNG, WebP or BMP)",
    "bad/latin1.png": "its caption latin1.txt is not UTF-8 (byte 0xe9 at offset 3); "
                      "save it as UTF-8",
    "bad/notimage.jpg": "not an image (the content is not a known image format)",
    "bad/tiny.png": "too small for resolution 64: 8x8 would be enlarged 8.00x to fill 64x64 "
                    "(more than 4x); use a larger image or remove it",
    "bad/truncated.jpg": "truncated image (the file ends early)",
    "bad/zero.jpg": "empty file (0 bytes)",
}


def build_good(root: Path) -> None:
    for seed, rel in enumerate(GOOD):
        save_image(root / rel, (64, 64), seed=seed, caption=f"shape, {Path(rel).stem}")


def build_broken(root: Path) -> None:
    """One file of every broken kind in `root`/bad (nothing else there)."""
    bad = root / "bad"
    bad.mkdir(parents=True)
    noise_image((32, 32), 1).save(bad / "anim.gif")
    noise_image((32, 32), 2).save(bad / "gif_inside.png", format="GIF")
    jpeg = save_image(root / "scratch" / "t.jpg", (64, 64), seed=3).read_bytes()
    (bad / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    png = bytearray(save_image(root / "scratch" / "c.png", (64, 64), seed=4).read_bytes())
    for i in range(len(png) // 2, len(png) // 2 + 64):  # garble compressed pixel data
        png[i] ^= 0x5A
    (bad / "corrupt.png").write_bytes(bytes(png))
    shutil.rmtree(root / "scratch")
    (bad / "zero.jpg").write_bytes(b"")
    (bad / "notimage.jpg").write_text("this is not an image")
    save_image(bad / "tiny.png", (8, 8), seed=5, caption="tiny")
    save_image(bad / "latin1.png", (64, 64), seed=6)
    (bad / "latin1.txt").write_bytes("café".encode("latin-1"))
    Image.new("L", (1, 1)).save(bad / "bomb.png")  # a header that claims 100000 x 100000
    data = bytearray((bad / "bomb.png").read_bytes())
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    (bad / "bomb.png").write_bytes(bytes(data))


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    root = tmp_path / "mixed"
    build_good(root)
    build_broken(root)
    return root


def config(model_dir: Path, dataset: Path, out: Path, **overrides):
    values = {"model.path": str(model_dir / "diffusers"), "dataset.path": str(dataset),
              "dataset.resolution": 64, "dataset.buckets": False, "network.rank": 4,
              "network.alpha": 4, "network.train_text_encoder": False, "train.steps": 2,
              "train.batch_size": 1, "output.dir": str(out), "output.name": "skips",
              **overrides}
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in values.items()])


def skipped_lines(text: str) -> list[str]:
    """The indented file lines of the 'N files skipped' block."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if "skipped (not trained on):" in line)
    block = []
    for line in lines[start + 1:]:
        if not line.startswith("  "):
            break
        block.append(line)
    return block


EXPECTED_LINES = [f"  {rel}: {why}" for rel, why in sorted(BROKEN.items())]


def check_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "datasets_tools", "check", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_the_check_exits_0_and_lists_every_skipped_file_with_why(mixed: Path) -> None:
    done = check_cli(str(mixed), "--resolution", "64", "--no-buckets")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(BROKEN)} files skipped (not trained on):" in done.stdout
    assert skipped_lines(done.stdout) == EXPECTED_LINES
    assert done.stdout.splitlines()[-1].startswith(
        f"Trainable: {len(GOOD)} images, {len(GOOD)} samples per epoch with repeats, "
        f"{len(BROKEN)} files skipped")
    strict = check_cli(str(mixed), "--resolution", "64", "--no-buckets", "--strict", "--json")
    assert strict.returncode == 1
    report = json.loads(strict.stdout)
    assert (report["trainable"], report["strict"], report["skipped"]) == (False, True, 9)


def test_training_skips_exactly_the_broken_files_and_logs_them_first(
        demo_model_dir, mixed, tmp_path, capsys, one_torch_thread) -> None:
    from safetensors import safe_open

    from trainer.train import run

    result = run(config(demo_model_dir, mixed, tmp_path / "out"))
    assert result.steps_done == 2 and len(result.losses) == 2
    err = capsys.readouterr().err
    assert f"dataset: {len(BROKEN)} files skipped (not trained on):" in err
    assert skipped_lines(err) == EXPECTED_LINES  # the check's list, in the run's log
    assert err.index("files skipped") < err.index("training")  # before the first step
    with safe_open(str(tmp_path / "out" / "skips.safetensors"), "pt") as file:
        metadata = file.metadata()
    # The adapter was trained on the good images only.
    assert metadata["ss_num_train_images"] == str(len(GOOD))
    tags = json.loads(metadata["ss_tag_frequency"])
    assert Counter(tags["good"]) == {"shape": 3, "a": 1, "b": 1, "c": 1}
    assert "bad" not in tags


def test_the_plan_holds_the_good_images_only(demo_model_dir, mixed, tmp_path,
                                             one_torch_thread) -> None:
    from trainer.run_plan import resolve_run

    plan = resolve_run(config(demo_model_dir, mixed, tmp_path / "out"))["dataset"]
    assert sorted(item[0] for item in plan["items"]) == GOOD
    assert plan["samples_per_epoch"] == len(GOOD) and plan["buckets"] == [(64, 64)]


def test_strict_refuses_naming_the_setting_and_every_file(demo_model_dir, mixed,
                                                          tmp_path) -> None:
    from trainer.train import run

    with pytest.raises(UserError) as info:
        run(config(demo_model_dir, mixed, tmp_path / "out", **{"dataset.strict": True}))
    message = str(info.value)
    assert message.startswith(f"dataset.strict = true refuses {mixed}: 9 files cannot be used")
    assert "set dataset.strict = false" in message
    assert skipped_lines(message) == EXPECTED_LINES
    assert not (tmp_path / "out" / "skips.safetensors").exists()


def test_a_folder_without_a_usable_image_is_refused(demo_model_dir, tmp_path) -> None:
    from trainer.train import run

    build_broken(tmp_path / "all-broken")
    with pytest.raises(UserError) as info:
        run(config(demo_model_dir, tmp_path / "all-broken", tmp_path / "out"))
    message = str(info.value)
    assert "error    .: no usable image: all 9 files found are skipped" in message
    assert skipped_lines(message) == EXPECTED_LINES
    assert message.splitlines()[-1].startswith("Not trainable: 1 error")
    done = check_cli(str(tmp_path / "all-broken"), "--resolution", "64", "--no-buckets")
    assert done.returncode == 1


def test_the_gui_report_lists_the_skipped_files(mixed: Path) -> None:
    from gui import datasets, views

    result = datasets.check(str(mixed), 64, False, 256, 1024, 64, False, ".txt")
    assert result.trainable
    text = views.check_report(result.report, Counter())
    assert text.startswith("### Trainable: 3 images, 3 samples per epoch (with repeats), "
                           "9 files skipped, 1 warning\n")
    assert "| warning | bad | no usable image in this folder |" in text
    assert "**9 files skipped** (not trained on)" in text
    assert "| bad/truncated.jpg | truncated image (the file ends early) |" in text
    assert "| skipped |" not in text  # in their own list, not among the problems
    strict = datasets.check(str(mixed), 64, False, 256, 1024, 64, False, ".txt", strict=True)
    assert not strict.trainable
    assert views.check_report(strict.report, Counter()).startswith(
        "### Not trainable with dataset.strict = true: 9 files would be skipped")


def test_caption_tools_refuse_an_unreadable_caption_of_a_skipped_image(mixed: Path) -> None:
    from gui import datasets

    with pytest.raises(UserError, match="latin1.txt is not a caption file"):
        datasets.add_trigger(mixed, "sks", ".txt")
    assert (mixed / "good" / "a.txt").read_text() == "shape, a"  # all or nothing


def test_an_unreadable_subfolder_is_skipped_and_an_unreadable_root_refused(
        tmp_path, monkeypatch) -> None:
    # Permissions do not stop root (these tests may run as root): the listing fails instead.
    import datasets_tools.scan as scan
    from datasets_tools import check_dataset
    from datasets_tools.buckets import BucketConfig

    build_good(tmp_path / "d")
    save_image(tmp_path / "d" / "locked" / "x.png", (64, 64), seed=9, caption="x")
    listing = scan._visible_entries

    def refuse(folder, budget):
        if folder.name in ("locked", "d-locked"):
            raise PermissionError(13, "Permission denied")
        return listing(folder, budget)

    monkeypatch.setattr(scan, "_visible_entries", refuse)
    config = BucketConfig(resolution=64, enabled=False)
    report = check_dataset(tmp_path / "d", config)
    assert report.trainable and sorted(i.rel_path for i in report.items) == GOOD
    assert [(p.path, p.reason) for p in report.skipped] == [
        ("locked", "folder cannot be read (Permission denied)")]
    (tmp_path / "d").rename(tmp_path / "d-locked")
    report = check_dataset(tmp_path / "d-locked", config)
    assert not report.trainable
    assert [(p.severity.value, p.reason) for p in report.errors] == [
        ("error", "folder cannot be read (Permission denied)")]
