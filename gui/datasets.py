"""Dataset work behind the Dataset tab: listing, thumbnails, caption edits
(each written atomically, only where `gui.paths` allows), the demo images and
the `datasets_tools check` report. Uploads are in `gui.uploads`.

Listing reads image headers only (`datasets_tools.scan`, no torch); the full
check decodes every image, so it runs as the CLI in a child process.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from core.atomic import atomic_write_text
from core.errors import UserError
from datasets_tools.captions import split_tags
from datasets_tools.formats import DECODE_ERRORS
from datasets_tools.scan import CAPTION_PROBLEMS, ImageItem, scan_dataset
from gui import paths
from gui.cli_runs import explain_failure, python_module, run_cli

THUMB_SIZE = 256
GALLERY_LIMIT = 500  # a gallery of thousands of images would freeze the browser


def open_folder(text: str) -> Path:
    """A folder that can be a dataset (existing, not a system folder), resolved."""
    return paths.dataset_folder(text)


def list_images(folder: Path, caption_extension: str = ".txt",
                cancel: threading.Event | None = None) -> list[ImageItem]:
    return scan_dataset(folder, caption_extension, cancel=cancel).items


def thumbnail(image: Path, thumbs: Path) -> Path | None:
    """A small JPEG of `image` (cached by path, size and time), or None if it
    does not decode (the check report says why)."""
    from PIL import Image, ImageOps

    stat = image.stat()
    key = hashlib.sha1(f"{image}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    target = thumbs / f"{key}.jpg"
    if target.exists():
        return target
    try:
        with Image.open(image) as opened:
            opened.draft("RGB", (THUMB_SIZE, THUMB_SIZE))  # JPEG: decode at a reduced scale
            small = ImageOps.exif_transpose(opened).convert("RGB")
            small.thumbnail((THUMB_SIZE, THUMB_SIZE))
    except DECODE_ERRORS:
        return None
    tmp = target.with_suffix(".tmp.jpg")
    small.save(tmp, "JPEG", quality=85)
    tmp.replace(target)
    return target


# --- captions ----------------------------------------------------------------
def image_in(folder: Path, rel_path: str) -> Path:
    """The image `rel_path` inside `folder`; anything pointing outside is refused."""
    return paths.image_in(folder.resolve(), rel_path)


def read_caption(folder: Path, rel_path: str, caption_extension: str) -> str:
    folder = folder.resolve()
    path = paths.caption_file(folder, image_in(folder, rel_path), caption_extension)
    return path.read_text(encoding="utf-8-sig").strip() if path.exists() else ""


def save_caption(folder: Path, rel_path: str, text: str, caption_extension: str) -> Path:
    folder = folder.resolve()
    path = paths.caption_file(folder, image_in(folder, rel_path), caption_extension)
    # One line: the trainer reads a caption file's first line only.
    atomic_write_text(path, " ".join(text.split()) + "\n")
    return path


def add_trigger(folder: Path, word: str, caption_extension: str,
                cancel: threading.Event | None = None) -> int:
    """Put `word` first in every caption that does not start with it; returns
    how many captions changed (images without one get a caption file)."""
    word = word.strip()
    if not word or "," in word:
        raise UserError("Enter one trigger word or phrase, without commas (e.g. sks).")
    changed = 0
    for item in _captioned(folder, caption_extension, cancel):
        tags = split_tags(read_caption(folder, item.rel_path, caption_extension))
        if tags[:1] != [word]:
            save_caption(folder, item.rel_path, ", ".join([word, *[t for t in tags if t != word]]),
                         caption_extension)
            changed += 1
    return changed


def replace_tag(folder: Path, find: str, replace: str, caption_extension: str,
                cancel: threading.Event | None = None) -> int:
    """Replace a whole comma-separated tag (an empty replacement removes it)."""
    find, replace = find.strip(), replace.strip()
    if not find:
        raise UserError("Enter the tag to find (a whole tag between commas).")
    changed = 0
    for item in _captioned(folder, caption_extension, cancel):
        tags = split_tags(read_caption(folder, item.rel_path, caption_extension))
        if find in tags:
            new = []
            for tag in tags:
                kept = replace if tag == find else tag
                if kept and kept not in new:
                    new.append(kept)
            save_caption(folder, item.rel_path, ", ".join(new), caption_extension)
            changed += 1
    return changed


def _captioned(folder: Path, caption_extension: str,
               cancel: threading.Event | None) -> list[ImageItem]:
    """The images to edit, once every caption file is known to be editable:
    a tool over all captions either changes them all or none."""
    paths.caption_extension(caption_extension)
    scan = scan_dataset(folder, caption_extension, cancel=cancel)
    root = folder.resolve()
    # Images skipped for their caption file count too: that file is refused by name.
    unreadable = [p.path for p in scan.problems if p.code in CAPTION_PROBLEMS]
    for rel in [item.rel_path for item in scan.items] + unreadable:
        paths.caption_file(root, image_in(root, rel), caption_extension)
    return scan.items


def tag_counts(items: list[ImageItem]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for item in items:
        counts.update(set(split_tags(item.caption)))
    return counts


# --- the demo images --------------------------------------------------------------
def copy_demo(datasets: Path) -> Path:
    """The built-in demo images, copied so that edits never change the original."""
    from trainer.demo_assets import ensure_demo_dataset

    target = datasets / "demo-shapes"
    if not target.exists():
        # Copied beside it and renamed, so a copy cut short is never taken for the demo.
        staging = datasets / f".demo-shapes-{os.getpid()}-{threading.get_ident()}"
        try:
            shutil.copytree(ensure_demo_dataset(), staging)
            staging.rename(target)
        except OSError:
            if not target.is_dir():  # else another tab's copy got there first
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


# --- the check report ------------------------------------------------------------
@dataclass(frozen=True)
class CheckResult:
    trainable: bool
    report: dict | None  # the CLI's JSON; None when the check itself failed
    message: str  # why the check could not run


def check(folder: str, resolution: int, buckets: bool, min_bucket: int, max_bucket: int,
          bucket_step: int, no_upscale: bool, caption_extension: str,
          cancel: threading.Event | None = None, *, repeats: int = 1,
          strict: bool = False) -> CheckResult:
    """`repeats`: dataset.repeats, so that the report counts the samples training will see;
    `strict`: dataset.strict, so that the verdict is the trainer's."""
    args = ["check", folder, "--json", "--resolution", str(resolution), "--bucket-step",
            str(bucket_step), "--min-bucket", str(min_bucket), "--max-bucket", str(max_bucket),
            "--caption-extension", caption_extension, "--repeats", str(repeats)]
    args += ([] if buckets else ["--no-buckets"]) + (["--no-upscale"] if no_upscale else [])
    args += ["--strict"] if strict else []
    result = run_cli(python_module("datasets_tools", *args), "The dataset check", timeout=1800,
                     cancel=cancel)
    if result.returncode not in (0, 1):
        return CheckResult(False, None, explain_failure(
            result.returncode, result.stderr, "The dataset check"))
    report = json.loads(result.stdout)
    return CheckResult(bool(report["trainable"]), report, "")


def reg_check(reg_folder: Path, train_report: dict, bucket_settings: list,
              caption_extension: str, cancel: threading.Event | None = None, *,
              strict: bool = False) -> str:
    """The report of dataset.reg_path, shown under the training set's: the same
    check (images outside `N_class` folders count once), and how many reg samples
    an epoch draws against `train_report`'s (kohya's rule, datasets_tools.regularization)."""
    from datasets_tools.regularization import describe, plan_reg
    from gui import views

    result = check(str(reg_folder), *bucket_settings, caption_extension, cancel=cancel,
                   repeats=1, strict=strict)
    if result.report is None:
        raise UserError(f"dataset.reg_path: {result.message}")
    skipped = {p["path"] for p in result.report["problems"] if p["severity"] == "skipped"}
    # The check's usable images, in its order (the order kohya's rule takes them in).
    items = [i for i in list_images(reg_folder, caption_extension, cancel)
             if i.rel_path not in skipped]
    lines = [f"## Regularization images (dataset.reg_path = {views.escape(str(reg_folder))})",
             views.check_report(result.report, tag_counts(items))]
    if result.trainable and train_report["trainable"]:
        plan = plan_reg(train_report["samples_per_epoch"], [i.repeats for i in items])
        lines.append(f"**Per epoch:** {views.escape(describe(plan))}; an epoch is "
                     f"{plan.train_samples + plan.reg_samples} samples.")
    return "\n\n".join(lines)
