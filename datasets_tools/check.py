"""Full dataset validation: the report that `check` prints and the trainer enforces."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .buckets import BucketConfig, assign_bucket, bucket_report, make_buckets, upscale_factor
from .crop import compute_crop
from .formats import SUPPORTED_EXTENSIONS, ImageDecodeError
from .loading import decode_image
from .masks import MaskCheck, check_mask, leave_out_mask_folder, mask_folder, no_mask_at_all
from .report import (
    DATASET_PATH,
    Problem,
    Report,
    Severity,
    error,
    skipped,
    sort_problems,
    warning,
)
from .scan import FolderInfo, ImageItem, ScanLimits, scan_dataset

# Beyond this enlargement an image is mostly interpolation; training on it
# teaches blur, so it is skipped rather than warned about.
MAX_UPSCALE = 4.0


@dataclass(frozen=True)
class _Verified:
    item: ImageItem
    bucket: tuple[int, int]
    digest: str | None  # sha256 of the file bytes; None when unreadable
    failure: ImageDecodeError | None  # why it cannot be used, if it cannot
    mask: MaskCheck | None = None  # with masked loss


def check_dataset(
    root: str | os.PathLike[str],
    config: BucketConfig | None = None,
    *,
    caption_extension: str = ".txt",
    progress: bool = False,
    workers: int | None = None,
    limits: ScanLimits | None = None,
    cancel: threading.Event | None = None,
    repeats: int = 1,
    strict: bool = False,
    masked_loss: bool = False,
    mask_dir: str | os.PathLike[str] | None = None,
) -> Report:
    """Scan and fully decode every image under `root`; list every problem.

    A file that cannot be used is skipped (listed, left out of `Report.items`);
    with `strict` any skipped file makes the report untrainable.
    `config` defaults to 512 px aspect buckets; `repeats` counts for images
    outside kohya "N_name" folders (`scan_dataset`). With `masked_loss` each image's
    mask (file in `mask_dir`, else alpha; `datasets_tools.masks`) is checked too:
    a bad mask skips its image, a missing one is a warning. Never raises for bad content;
    raises UserError for invalid options (bad caption extension) and
    `ScanStopped` when the folder walk is refused, too big or cancelled.
    """
    config = config or BucketConfig()
    masks = mask_folder(mask_dir) if masked_loss else None
    scan = scan_dataset(root, caption_extension, limits, cancel, repeats)
    leave_out_mask_folder(scan, masks)
    problems: list[Problem] = list(scan.problems)
    buckets = make_buckets(config)
    workers = workers or min(4, os.cpu_count() or 1)

    usable: list[ImageItem] = []
    assigned: list[tuple[int, int]] = []
    first_by_digest: dict[str, str] = {}
    rejected: set[str] = set()
    masked = 0  # usable images with a mask
    verified = _verify_all(scan.items, config, buckets, workers, progress, masked_loss, masks)
    for v in verified:
        found, ok = _file_problems(v, config.resolution)
        problems += found
        if not ok:
            rejected.add(v.item.rel_path)
            continue
        masked += v.mask is not None and v.mask.has_mask
        if v.digest in first_by_digest:
            first = first_by_digest[v.digest]
            problems.append(warning("duplicate", v.item.rel_path,
                                    f"duplicate of {first} (identical content)"))
        elif v.digest is not None:
            first_by_digest[v.digest] = v.item.rel_path
        usable.append(v.item)
        assigned.append(v.bucket)

    # A skipped file is reported once, not also for its missing caption.
    problems = [p for p in problems if not (p.code == "missing_caption" and p.path in rejected)]
    problems += _folder_problems(scan.folders, usable, scan.skipped_folders)
    root_failed = any(p.path == DATASET_PATH and p.severity is Severity.ERROR for p in problems)
    if not usable and not root_failed:
        problems.append(_no_usable_image(problems))
    elif masked_loss and usable and not masked:  # one line says it, not one per image
        problems = [p for p in problems if p.code != "no_mask"] + [no_mask_at_all(masks)]
    report = bucket_report(zip(assigned, (i.repeats for i in usable), strict=True),
                           config.resolution)
    return Report(root=str(scan.root), resolution=config.resolution,
                  problems=sort_problems(problems), items=usable, buckets=report, strict=strict)


def _file_problems(v: _Verified, resolution: int) -> tuple[list[Problem], bool]:
    """What is wrong with one file, and whether it can still be trained on."""
    if v.failure is not None:
        return [skipped(v.failure.code, v.item.rel_path, v.failure.reason)], False
    found = []
    size_problem = _size_problem(v.item, v.bucket, resolution)
    if size_problem is not None:
        found.append(size_problem)
        if size_problem.severity is Severity.SKIPPED:
            return found, False
    if v.mask is not None and v.mask.problem is not None:
        found.append(v.mask.problem)
    return found, v.mask is None or v.mask.usable


def _no_usable_image(problems: list[Problem]) -> Problem:
    n_skipped = sum(p.severity is Severity.SKIPPED for p in problems)
    if n_skipped:
        which = "the only file found is" if n_skipped == 1 else f"all {n_skipped} files found are"
        return error("no_usable_image", DATASET_PATH,
                     f"no usable image: {which} skipped (listed below); fix or replace them")
    kinds = ", ".join(sorted(SUPPORTED_EXTENSIONS))
    return error("no_usable_image", DATASET_PATH,
                 f"no usable image found (looked for {kinds} files, also in subfolders)")


def _verify_all(
    items: list[ImageItem],
    config: BucketConfig,
    buckets: tuple[tuple[int, int], ...],
    workers: int,
    progress: bool,
    masked_loss: bool = False,
    mask_dir: Path | None = None,
) -> Iterator[_Verified]:
    def verify(item: ImageItem) -> _Verified:
        bucket = assign_bucket((item.width, item.height), config, buckets)
        crop = compute_crop((item.width, item.height), bucket)
        try:
            data = item.path.read_bytes()
        except OSError as exc:
            failure = ImageDecodeError("unreadable", f"cannot be read ({exc.strerror})")
            return _Verified(item, bucket, None, failure)
        digest = hashlib.sha256(data).hexdigest()
        try:
            # Same decode path and draft size as training, so what passes here loads there.
            image = decode_image(item.path, keep_alpha=masked_loss,
                                 draft_size=(crop.scaled_w, crop.scaled_h), data=data)
        except ImageDecodeError as exc:
            return _Verified(item, bucket, digest, exc)
        if not masked_loss:
            return _Verified(item, bucket, digest, None)
        mask = check_mask(item.rel_path, (item.width, item.height), image.mode == "RGBA",
                          mask_dir)
        return _Verified(item, bucket, digest, None, mask)

    # Pillow releases the GIL while decoding, so threads use every core.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(verify, items)
        yield from tqdm(results, total=len(items), desc="Checking images", unit="img",
                        disable=not progress)


def _size_problem(item: ImageItem, bucket: tuple[int, int], resolution: int) -> Problem | None:
    factor = upscale_factor((item.width, item.height), bucket)
    if factor <= 1.0:
        return None
    what = f"{item.width}x{item.height}"
    target = f"{bucket[0]}x{bucket[1]}"
    if factor > MAX_UPSCALE:
        return skipped("too_small", item.rel_path, (
            f"too small for resolution {resolution}: {what} would be enlarged {factor:.2f}x to "
            f"fill {target} (more than {MAX_UPSCALE:g}x); use a larger image or remove it"))
    return warning("too_small", item.rel_path,
                   f"too small for resolution {resolution}: {what} is enlarged {factor:.2f}x "
                   f"to fill {target}")


def _folder_problems(
    folders: list[FolderInfo], usable: list[ImageItem], skipped: set[str]
) -> list[Problem]:
    has_usable: set[str] = set()
    for item in usable:
        parts = Path(item.rel_path).parts[:-1]
        has_usable.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
    return [
        warning("folder_without_images", f.rel_path, "no usable image in this folder")
        for f in folders
        if f.rel_path != DATASET_PATH and f.entries > 0
        and f.rel_path not in has_usable and f.rel_path not in skipped
    ]
