"""Dataset work behind the Dataset tab: importing images, thumbnails, caption
edits (each written atomically), and the `datasets_tools check` report.

Listing reads image headers only (`datasets_tools.scan`, no torch); the full
check decodes every image, so it runs as the CLI in a child process.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from datasets_tools.captions import split_tags
from datasets_tools.formats import DECODE_ERRORS, SUPPORTED_EXTENSIONS
from datasets_tools.scan import ImageItem, scan_dataset
from gui.cli_runs import explain_failure, python_module, run_cli
from trainer.atomic import atomic_write_text
from trainer.errors import UserError

THUMB_SIZE = 256
GALLERY_LIMIT = 500  # a gallery of thousands of images would freeze the browser
_KEPT_SUFFIXES = SUPPORTED_EXTENSIONS | {".txt", ".caption", ".json", ".toml"}


def open_folder(text: str) -> Path:
    folder = Path(text.strip()).expanduser()
    if not text.strip():
        raise UserError("Enter the path of a folder of images (on the machine running this app).")
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise UserError(f"{folder} {what}; enter the path of a folder of images.")
    return folder.resolve()


def list_images(folder: Path, caption_extension: str = ".txt") -> list[ImageItem]:
    return scan_dataset(folder, caption_extension).items


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
    """`rel_path` inside `folder`; anything pointing outside is refused."""
    path = (folder / rel_path).resolve()
    if not path.is_relative_to(folder.resolve()) or not path.is_file():
        raise UserError(f"{rel_path} is not an image in {folder}; pick one from the gallery.")
    return path


def caption_path(image: Path, caption_extension: str) -> Path:
    return image.with_suffix(caption_extension)


def read_caption(folder: Path, rel_path: str, caption_extension: str) -> str:
    path = caption_path(image_in(folder, rel_path), caption_extension)
    return path.read_text(encoding="utf-8").strip() if path.exists() else ""


def save_caption(folder: Path, rel_path: str, text: str, caption_extension: str) -> Path:
    path = caption_path(image_in(folder, rel_path), caption_extension)
    # One line: the trainer reads a caption file's first line only.
    atomic_write_text(path, " ".join(text.split()) + "\n")
    return path


def add_trigger(folder: Path, word: str, caption_extension: str) -> int:
    """Put `word` first in every caption that does not start with it; returns
    how many captions changed (images without one get a caption file)."""
    word = word.strip()
    if not word or "," in word:
        raise UserError("Enter one trigger word or phrase, without commas (e.g. sks).")
    changed = 0
    for item in list_images(folder, caption_extension):
        tags = split_tags(read_caption(folder, item.rel_path, caption_extension))
        if tags[:1] != [word]:
            save_caption(folder, item.rel_path, ", ".join([word, *[t for t in tags if t != word]]),
                         caption_extension)
            changed += 1
    return changed


def replace_tag(folder: Path, find: str, replace: str, caption_extension: str) -> int:
    """Replace a whole comma-separated tag (an empty replacement removes it)."""
    find, replace = find.strip(), replace.strip()
    if not find:
        raise UserError("Enter the tag to find (a whole tag between commas).")
    changed = 0
    for item in list_images(folder, caption_extension):
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


def tag_counts(items: list[ImageItem]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for item in items:
        counts.update(set(split_tags(item.caption)))
    return counts


# --- importing -----------------------------------------------------------------
def import_files(files: list[str], datasets: Path, name: str) -> tuple[Path, int]:
    """Copy uploaded images/captions, or the contents of zip files, into
    `datasets/name`; refuses to overwrite a file already there."""
    if not files:
        raise UserError("Choose image files (with their .txt captions) or a .zip to upload.")
    target = datasets / name
    count = 0
    for file in map(Path, files):
        if file.suffix.lower() == ".zip":
            count += _unzip(file, target)
        elif file.suffix.lower() in _KEPT_SUFFIXES:
            _copy_new(file, target / file.name)
            count += 1
        else:
            raise UserError(f"{file.name}: not an image, caption or .zip; upload JPEG, PNG, "
                            "WebP or BMP images, .txt captions, or a .zip of them.")
    return target, count


def _unzip(archive: Path, target: Path) -> int:
    try:
        with zipfile.ZipFile(archive) as zipped:
            count = 0
            for member in zipped.infolist():
                parts = PurePosixPath(member.filename.replace("\\", "/")).parts
                # Zip Slip: absolute names and '..' would write outside the dataset.
                if member.is_dir() or not parts or parts[0] == "__MACOSX" or ".." in parts \
                        or member.filename.startswith("/"):
                    continue
                if PurePosixPath(*parts).suffix.lower() not in _KEPT_SUFFIXES:
                    continue
                destination = target.joinpath(*parts)
                if destination.exists():
                    raise UserError(f"{destination} already exists; upload into a new dataset "
                                    "name or remove the file first.")
                destination.parent.mkdir(parents=True, exist_ok=True)
                with zipped.open(member) as source, open(destination, "wb") as out:
                    shutil.copyfileobj(source, out)
                count += 1
            return count
    except zipfile.BadZipFile:
        raise UserError(f"{archive.name} is not a readable .zip file.") from None


def _copy_new(source: Path, destination: Path) -> None:
    if destination.exists():
        raise UserError(f"{destination} already exists; upload into a new dataset name or "
                        "remove the file first.")
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, destination)


def copy_demo(datasets: Path) -> Path:
    """The built-in demo images, copied so that edits never change the original."""
    from trainer.demo_assets import ensure_demo_dataset

    target = datasets / "demo-shapes"
    if not target.exists():
        shutil.copytree(ensure_demo_dataset(), target)
    return target


# --- the check report ------------------------------------------------------------
@dataclass(frozen=True)
class CheckResult:
    trainable: bool
    report: dict | None  # the CLI's JSON; None when the check itself failed
    message: str  # why the check could not run


def check(folder: str, resolution: int, buckets: bool, min_bucket: int, max_bucket: int,
          bucket_step: int, no_upscale: bool, caption_extension: str) -> CheckResult:
    args = ["check", folder, "--json", "--resolution", str(resolution), "--bucket-step",
            str(bucket_step), "--min-bucket", str(min_bucket), "--max-bucket", str(max_bucket),
            "--caption-extension", caption_extension]
    args += ([] if buckets else ["--no-buckets"]) + (["--no-upscale"] if no_upscale else [])
    result = run_cli(python_module("datasets_tools", *args), "The dataset check", timeout=1800)
    if result.returncode not in (0, 1):
        return CheckResult(False, None, explain_failure(
            result.returncode, result.stderr, "The dataset check"))
    report = json.loads(result.stdout)
    return CheckResult(bool(report["trainable"]), report, "")
