"""Uploaded images, captions and zips, copied into the datasets folder with
limits, all or nothing.

Everything is written into a hidden staging folder inside the datasets folder
and moved into place once all of it arrived, so a refused, failed or killed
upload leaves nothing behind. The limits are checked before anything is
written, from the sizes each zip declares, and again while writing, from the
bytes actually written, because a zip's declared sizes can lie.
"""

from __future__ import annotations

import os
import shutil
import uuid
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from core.errors import UserError
from datasets_tools.formats import SUPPORTED_EXTENSIONS

MAX_TOTAL_BYTES = 16 * 1024**3  # one upload, uncompressed
MAX_ENTRIES = 100_000  # entries of one zip, or files of one upload
MAX_RATIO = 200  # uncompressed : compressed, of a zip and of each big entry in it
RATIO_MIN_BYTES = 1024**2  # below this an entry may compress well (a caption) and be harmless
KEPT_SUFFIXES = SUPPORTED_EXTENSIONS | {".txt", ".caption", ".json", ".toml"}
STAGING_PREFIX = ".upload-"
_CHUNK = 1024**2
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError)


@dataclass(frozen=True)
class _Entry:
    """One file to write: from a zip (`member`) or an uploaded file."""

    source: Path
    rel: PurePosixPath  # inside the dataset
    size: int  # declared (zips) or on disk
    member: zipfile.ZipInfo | None = None


def import_files(files: list[str], datasets: Path, name: str) -> tuple[Path, int]:
    """Copy uploaded images/captions, or the contents of zip files, into
    `datasets/name`; refuses to overwrite a file already there."""
    if not files:
        raise UserError("Choose image files (with their .txt captions) or a .zip to upload.")
    target = datasets / name
    entries = [entry for file in map(Path, files) for entry in _entries_of(file)]
    if not entries:
        raise UserError("The upload holds no images or captions (JPEG, PNG, WebP or BMP, .txt); "
                        "nothing was written.")
    _check_declared(entries, target, datasets)
    datasets.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(datasets)
    staging = datasets / f"{STAGING_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
    try:
        staging.mkdir()
        _write_all(entries, staging)
        _move_into_place(staging, target)
    except OSError as error:
        raise UserError(f"Writing the upload into {datasets} failed ({error.strerror or error}); "
                        "nothing of it was kept. Free some disk space if the disk is full, then "
                        "upload again.") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target, len(entries)


def _entries_of(file: Path) -> list[_Entry]:
    suffix = file.suffix.lower()
    if suffix == ".zip":
        return _zip_entries(file)
    if suffix in KEPT_SUFFIXES:
        return [_Entry(file, PurePosixPath(file.name), file.stat().st_size)]
    raise UserError(f"{file.name}: not an image, caption or .zip; upload JPEG, PNG, WebP or BMP "
                    "images, .txt captions, or a .zip of them.")


def _zip_entries(archive: Path) -> list[_Entry]:
    try:
        with zipfile.ZipFile(archive) as zipped:
            members = zipped.infolist()
    except _ZIP_ERRORS:
        raise UserError(f"{archive.name} is not a readable .zip file.") from None
    if len(members) > MAX_ENTRIES:
        raise UserError(f"{archive.name} holds {len(members):,} entries, more than the limit of "
                        f"{MAX_ENTRIES:,} for one upload; nothing was written. Unpack it "
                        "yourself and open the folder instead.")
    kept = []
    for member in members:
        rel = _safe_name(member)
        if rel is not None:
            kept.append(_Entry(archive, rel, member.file_size, member))
            _check_ratio(archive, member.filename, member.file_size, member.compress_size)
    declared = sum(entry.size for entry in kept)
    _check_ratio(archive, None, declared, archive.stat().st_size)
    return kept


def _safe_name(member: zipfile.ZipInfo) -> PurePosixPath | None:
    """Where a zip entry goes inside the dataset, or None to skip it."""
    parts = PurePosixPath(member.filename.replace("\\", "/")).parts
    # Zip Slip: absolute names and '..' would write outside the dataset.
    if member.is_dir() or not parts or member.filename.startswith("/") or ".." in parts \
            or parts[0] == "__MACOSX" or any(part.startswith(".") for part in parts):
        return None
    rel = PurePosixPath(*parts)
    return rel if rel.suffix.lower() in KEPT_SUFFIXES else None


def _check_ratio(archive: Path, entry: str | None, size: int, compressed: int) -> None:
    if size > RATIO_MIN_BYTES and size > MAX_RATIO * max(compressed, 1):
        what = f"its entry {entry}" if entry else "its content"
        raise UserError(f"{archive.name}: {what} expands from {compressed:,} to {size:,} bytes, "
                        f"more than the compression ratio limit of {MAX_RATIO}:1 (images do "
                        "not compress like that; a zip that does is a zip bomb). Nothing was "
                        "written; unpack it yourself and open the folder instead.")


def _check_declared(entries: list[_Entry], target: Path, datasets: Path) -> None:
    if len(entries) > MAX_ENTRIES:
        raise UserError(f"The upload holds {len(entries):,} files, more than the limit of "
                        f"{MAX_ENTRIES:,}; nothing was written. Open the folder instead.")
    total = sum(entry.size for entry in entries)
    if total > MAX_TOTAL_BYTES:
        raise UserError(f"The upload would take {_size(total)} unpacked, more than the limit of "
                        f"{_size(MAX_TOTAL_BYTES)} for one upload; nothing was written. Copy the "
                        "images into a folder and open it instead.")
    free = shutil.disk_usage(datasets if datasets.exists() else datasets.parent).free
    if total > free:
        raise UserError(f"The upload would take {_size(total)} unpacked and {datasets} has "
                        f"{_size(free)} free; nothing was written. Free some space first.")
    for entry in entries:
        if (target / entry.rel).exists():
            raise UserError(f"{target / entry.rel} already exists; upload into a new dataset "
                            "name or remove the file first.")


class _Budget:
    """Bytes written by one upload, counted as they are written."""

    def __init__(self) -> None:
        self.total = 0

    def copy(self, source: BinaryIO, out: BinaryIO, entry: _Entry) -> None:
        written = 0
        while chunk := source.read(_CHUNK):
            written += len(chunk)
            self.total += len(chunk)
            if written > entry.size:
                raise UserError(f"{entry.source.name}: {entry.rel} holds more than the "
                                f"{entry.size:,} bytes it declares; nothing was written.")
            if self.total > MAX_TOTAL_BYTES:
                raise UserError(f"{entry.source.name} unpacks to more than the limit of "
                                f"{_size(MAX_TOTAL_BYTES)} for one upload; nothing was written.")
            out.write(chunk)


def _write_all(entries: list[_Entry], staging: Path) -> None:
    budget = _Budget()
    open_zips: dict[Path, zipfile.ZipFile] = {}
    try:
        for entry in entries:
            destination = staging.joinpath(*entry.rel.parts)
            destination.parent.mkdir(parents=True, exist_ok=True)
            try:
                out = open(destination, "xb")
            except FileExistsError:
                raise UserError(f"{entry.rel} is in the upload twice; nothing was written. "
                                "Upload it once.") from None
            with out:
                if entry.member is None:
                    with open(entry.source, "rb") as source:
                        budget.copy(source, out, entry)
                    continue
                if entry.source not in open_zips:
                    open_zips[entry.source] = zipfile.ZipFile(entry.source)
                with open_zips[entry.source].open(entry.member) as source:
                    budget.copy(source, out, entry)
    except _ZIP_ERRORS as error:
        raise UserError(f"The upload cannot be unpacked ({error}); nothing was written. Check "
                        "that the zip is complete and not password-protected.") from None
    finally:
        for zipped in open_zips.values():
            zipped.close()


def _move_into_place(staging: Path, target: Path) -> None:
    """A new dataset is one rename; into an existing one, file by file, put
    back if any move fails."""
    if not target.exists():
        staging.rename(target)
        return
    files = sorted(p for p in staging.rglob("*") if p.is_file())
    moved: list[tuple[Path, Path]] = []
    created: list[Path] = []
    try:
        for source in files:
            destination = target / source.relative_to(staging)
            if destination.exists():
                raise UserError(f"{destination} already exists; upload into a new dataset name "
                                "or remove the file first.")
            for folder in reversed(destination.parents):
                if folder.is_relative_to(target) and not folder.exists():
                    folder.mkdir()
                    created.append(folder)
            source.rename(destination)
            moved.append((destination, source))
    except BaseException:
        for destination, source in reversed(moved):
            destination.rename(source)
        for folder in reversed(created):
            folder.rmdir()
        raise


def _size(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"


def _remove_stale_staging(datasets: Path) -> None:
    """Staging folders of uploads whose app was killed mid-way."""
    for folder in datasets.glob(f"{STAGING_PREFIX}*"):
        pid = folder.name.removeprefix(STAGING_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
