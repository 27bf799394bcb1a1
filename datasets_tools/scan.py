"""Walk a dataset folder: images, their captions, repeats and class tokens.

Only file headers are read here (sizes, formats), so a scan of thousands of
images takes about a second; `check.check_dataset` decodes the pixels.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import UserError

from .formats import (
    SUPPORTED_EXTENSIONS,
    SUPPORTED_LIST,
    UNSUPPORTED_EXTENSIONS,
    ImageDecodeError,
    read_header,
)
from .report import DATASET_PATH, Problem, error, skipped, warning
from .scan_limits import ScanBudget, ScanLimits, ScanStopped, refuse_system_folder

__all__ = ["FolderInfo", "ImageItem", "ScanLimits", "ScanResult", "ScanStopped",
           "normalise_caption_extension", "scan_dataset"]

# kohya convention: "10_sks dog" = 10 repeats of every image, class token "sks dog".
_REPEATS_FOLDER = re.compile(r"^(\d+)_(.+)$")
FALLBACK_CAPTION_EXTENSION = ".caption"
# Written by operating systems and archivers, never meant as training data.
_SILENTLY_IGNORED = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini"})
# A caption is written next to its image with this extension (GUI caption edits,
# trigger words), so an extension that other programs execute or load would
# turn a caption edit into a file they trust.
_CAPTION_EXTENSION = re.compile(r"\.[a-z0-9][a-z0-9_]{0,15}")
# Codes of images skipped because of their caption file (the GUI's caption
# tools refuse to edit around those).
CAPTION_PROBLEMS = frozenset({"caption_unreadable", "caption_not_utf8"})
_NOT_CAPTION_EXTENSIONS = frozenset({
    ".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".onnx", ".gguf", ".pkl", ".pickle",
    ".npy", ".npz", ".h5", ".msgpack", ".py", ".pyc", ".pyw", ".sh", ".bash", ".zsh", ".fish",
    ".bat", ".cmd", ".com", ".exe", ".dll", ".so", ".dylib", ".msi", ".scr", ".lnk",
    ".ps1", ".psm1", ".vbs", ".js", ".mjs", ".cjs", ".ts", ".jar", ".php", ".pl", ".rb",
    ".desktop", ".toml", ".json", ".jsonl", ".yaml", ".yml", ".ini", ".cfg", ".conf", ".xml",
    ".html", ".htm", ".svg", ".zip", ".tar", ".gz", ".7z", ".rar",
})


@dataclass(frozen=True)
class ImageItem:
    path: Path  # absolute
    rel_path: str  # relative to the dataset root, POSIX separators
    width: int  # as displayed, i.e. after EXIF orientation
    height: int
    format: str
    caption: str  # caption file's first line, or the class token when there is none
    caption_path: Path | None
    repeats: int
    class_token: str
    folder: str  # dataset folder the image counts for (key of the tag frequency table)
    frames: int = 1  # animated files: only the first frame is used


@dataclass(frozen=True)
class FolderInfo:
    rel_path: str  # "." for the root
    entries: int  # visible files and folders directly inside


@dataclass
class ScanResult:
    root: Path
    items: list[ImageItem] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    folders: list[FolderInfo] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)  # image files skipped
    skipped_folders: set[str] = field(default_factory=set)  # "0_name": deliberately unused

    def error(self, code: str, path: str, reason: str) -> None:
        self.problems.append(error(code, path, reason))

    def skip(self, code: str, path: str, reason: str) -> None:
        """`path` (an image, or a folder) is left out of training, for `reason`."""
        self.problems.append(skipped(code, path, reason))

    def warning(self, code: str, path: str, reason: str) -> None:
        self.problems.append(warning(code, path, reason))


@dataclass(frozen=True)
class _Context:
    repeats: int
    class_token: str
    folder: str
    from_repeats_folder: bool  # set by an "N_name" folder, inherited by its subfolders


def normalise_caption_extension(extension: str) -> str:
    """`extension` lower-cased with its dot, or UserError if captions cannot use it."""
    ext = extension.strip().lower()
    ext = ext if ext.startswith(".") else f".{ext}"
    if not _CAPTION_EXTENSION.fullmatch(ext):
        raise UserError(
            f"Caption extension {extension!r} is not usable: give a short extension of "
            "letters and digits, such as .txt (kohya's default), .caption or .tags.")
    if ext in SUPPORTED_EXTENSIONS | UNSUPPORTED_EXTENSIONS | _NOT_CAPTION_EXTENSIONS:
        raise UserError(
            f"Caption extension {extension!r} is not usable: it is the extension of an image, "
            "model, script or config file, and caption files are written next to the images "
            "with it; use .txt (kohya's default), .caption or .tags.")
    return ext


def scan_dataset(
    root: str | os.PathLike[str],
    caption_extension: str = ".txt",
    limits: ScanLimits | None = None,
    cancel: threading.Event | None = None,
    repeats: int = 1,
) -> ScanResult:
    """Find every image under `root` (recursively) with its caption and repeats.

    `repeats` counts for images outside any kohya "N_name" folder (kohya's
    `num_repeats`); such a folder's own count wins inside it.
    Never raises for bad content: problems are collected in `ScanResult.problems`.
    Raises UserError for an invalid caption extension or repeats below 1, and
    ScanStopped for a system folder, a walk past `limits` or a set `cancel`.
    """
    if repeats < 1:
        raise UserError(
            f"Repeats = {repeats} is not usable: give 1 or more (dataset.repeats, or --repeats "
            'of the check); to leave a folder out, name it "0_name" instead.')
    caption_exts = (normalise_caption_extension(caption_extension),)
    if caption_exts[0] != FALLBACK_CAPTION_EXTENSION:
        caption_exts += (FALLBACK_CAPTION_EXTENSION,)
    root_path = Path(root).absolute()
    refuse_system_folder(root_path)
    result = ScanResult(root_path)
    if not root_path.is_dir():
        what = "is not a folder" if root_path.exists() else "does not exist"
        result.error("missing_folder", DATASET_PATH, f"dataset folder {root_path} {what}")
        return result
    context = _context_for(root_path.name, "", None, repeats)
    budget = ScanBudget(root_path, limits or ScanLimits(), cancel)
    _scan_folder(root_path, "", context, caption_exts, result, {os.path.realpath(root_path)},
                 budget)
    return result


def _context_for(name: str, rel: str, parent: _Context | None, repeats: int = 1) -> _Context:
    """`repeats` applies to the root; other folders without a prefix take their parent's."""
    match = _REPEATS_FOLDER.match(name)
    if match:
        return _Context(int(match.group(1)), match.group(2), rel or name, True)
    if parent is not None and parent.from_repeats_folder:
        return parent  # subfolders of "10_cat" are part of that dataset folder
    if parent is not None:
        repeats = parent.repeats  # an unprefixed parent holds the dataset-wide count
    return _Context(repeats, name, rel or name, False)


def _scan_folder(
    folder: Path,
    rel: str,
    context: _Context,
    caption_exts: tuple[str, ...],
    result: ScanResult,
    visited: set[str],
    budget: ScanBudget,
) -> None:
    label = rel or DATASET_PATH
    budget.enter(rel)
    try:
        entries = sorted(_visible_entries(folder, budget), key=lambda e: e.name)
    except OSError as exc:
        # The root is the whole dataset; a subfolder is skipped like a file.
        report = result.skip if rel else result.error
        report("unreadable", label, f"folder cannot be read ({exc.strerror})")
        return
    result.folders.append(FolderInfo(label, len(entries)))
    if not entries:
        if rel:
            result.warning("empty_folder", label, "empty folder")
        return
    if context.repeats == 0:
        result.skipped_folders.add(label)
        result.warning("zero_repeats", label,
                       "0 repeats in the folder name: nothing in this folder is used")
        return

    images, captions, others, subfolders = _classify(entries, caption_exts)
    uncaptioned: list[tuple[str, str]] = []
    for entry, stem, ext in images:
        budget.check()  # header reads are slow on network drives
        file_rel = f"{rel}/{entry.name}" if rel else entry.name
        by_ext = captions.get(stem, {})
        caption_entry = next((by_ext[e] for e in caption_exts if e in by_ext), None)
        item = _scan_image(Path(entry.path), file_rel, ext, caption_entry, rel, context, result)
        if item is None:
            result.rejected.append(file_rel)
            continue
        result.items.append(item)
        if caption_entry is None:  # an unreadable caption file is reported on its own
            uncaptioned.append((file_rel, stem))
    _report_uncaptioned(uncaptioned, len(images), label, caption_exts[0], context, result)
    _report_leftovers({stem for _, stem, _ in images}, captions, others, rel, result)

    for entry in subfolders:
        real = os.path.realpath(entry.path)
        if real in visited:  # a symlink back up the tree would recurse forever
            continue
        sub_rel = f"{rel}/{entry.name}" if rel else entry.name
        sub_context = _context_for(entry.name, sub_rel, context)
        _scan_folder(Path(entry.path), sub_rel, sub_context, caption_exts, result,
                     visited | {real}, budget)


def _classify(entries: list[os.DirEntry[str]], caption_exts: tuple[str, ...]):
    """(images as (entry, stem, ext), captions by stem and ext, other extensions, folders)."""
    images, captions, others, subfolders = [], {}, [], []
    for entry in entries:
        if _is_dir(entry):
            subfolders.append(entry)
            continue
        stem, ext = os.path.splitext(entry.name)
        ext = ext.lower()
        if ext in SUPPORTED_EXTENSIONS or ext in UNSUPPORTED_EXTENSIONS:
            images.append((entry, stem, ext))
        elif ext in caption_exts:
            captions.setdefault(stem, {})[ext] = entry
        else:
            others.append(ext or "(no extension)")
    return images, captions, others, subfolders


def _report_leftovers(
    image_stems: set[str],
    captions: dict[str, dict[str, os.DirEntry[str]]],
    others: list[str],
    rel: str,
    result: ScanResult,
) -> None:
    for stem, by_ext in captions.items():
        if stem not in image_stems:
            for entry in by_ext.values():
                cap_rel = f"{rel}/{entry.name}" if rel else entry.name
                result.warning("orphan_caption", cap_rel, "caption without an image; ignored")
    if others:
        kinds = ", ".join(sorted(set(others)))
        files = f"{len(others)} file{'s' if len(others) != 1 else ''}"
        result.warning("ignored_files", rel or DATASET_PATH,
                       f"{files} ignored: neither images nor captions ({kinds})")


def _visible_entries(folder: Path, budget: ScanBudget) -> list[os.DirEntry[str]]:
    # Counted while listing, so one folder of millions of files stops early too.
    visible = []
    with os.scandir(folder) as it:
        for entry in it:
            budget.tick()
            if not entry.name.startswith(".") and entry.name not in _SILENTLY_IGNORED:
                visible.append(entry)
    return visible


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _scan_image(
    path: Path,
    file_rel: str,
    ext: str,
    caption_entry: os.DirEntry[str] | None,
    rel: str,
    context: _Context,
    result: ScanResult,
) -> ImageItem | None:
    if ext in UNSUPPORTED_EXTENSIONS:
        result.skip("unsupported_format", file_rel,
                    f"unsupported format {ext} (use {SUPPORTED_LIST})")
        return None
    try:
        size = path.stat().st_size
    except OSError as exc:
        result.skip("unreadable", file_rel, f"cannot be read ({exc.strerror})")
        return None
    if size == 0:
        result.skip("zero_bytes", file_rel, "empty file (0 bytes)")
        return None
    try:
        header = read_header(path)
    except ImageDecodeError as exc:
        result.skip(exc.code, file_rel, exc.reason)
        return None
    caption, caption_path = context.class_token, None
    if caption_entry is not None:
        cap_rel = f"{rel}/{caption_entry.name}" if rel else caption_entry.name
        try:
            text = _read_caption(Path(caption_entry.path), cap_rel, context, result)
        except ImageDecodeError as exc:
            # Training it under the class token would teach the wrong words.
            result.skip(exc.code, file_rel, f"its caption {caption_entry.name} {exc.reason}")
            return None
        if text is not None:
            caption, caption_path = text, Path(caption_entry.path)
    return ImageItem(path=path, rel_path=file_rel, width=header.width, height=header.height,
                     format=header.format, caption=caption, caption_path=caption_path,
                     repeats=context.repeats, class_token=context.class_token,
                     folder=context.folder, frames=header.frames)


def _read_caption(path: Path, cap_rel: str, context: _Context, result: ScanResult) -> str | None:
    """First non-empty line of a caption file, or None for an empty one (with a
    warning recorded). Raises ImageDecodeError when it cannot be read as text."""
    fallback = f'the class token "{context.class_token}" is used'
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageDecodeError("caption_unreadable", f"cannot be read ({exc.strerror})") from exc
    try:
        text = data.decode("utf-8-sig")  # Windows editors often add a BOM
    except UnicodeDecodeError as exc:
        raise ImageDecodeError(
            "caption_not_utf8", f"is not UTF-8 (byte 0x{data[exc.start]:02x} at offset "
            f"{exc.start}); save it as UTF-8") from exc
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        result.warning("empty_caption", cap_rel, f"caption file is empty; {fallback}")
        return None
    if len(lines) > 1:
        result.warning("multiline_caption", cap_rel,
                       f"caption has {len(lines)} lines; only the first is used")
    return lines[0]


def _report_uncaptioned(
    uncaptioned: list[tuple[str, str]],
    n_images: int,
    label: str,
    caption_ext: str,
    context: _Context,
    result: ScanResult,
) -> None:
    fallback = f'the class token "{context.class_token}" is used'
    if len(uncaptioned) > 1 and len(uncaptioned) == n_images:
        # One line instead of hundreds for a folder that is deliberately caption-free.
        result.warning("missing_captions", label,
                       f"no caption files for the {n_images} images in this folder; {fallback}")
        return
    for file_rel, stem in uncaptioned:
        result.warning("missing_caption", file_rel,
                       f"no caption file ({stem}{caption_ext}); {fallback}")
