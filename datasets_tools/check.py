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
from .report import DATASET_PATH, Problem, Report, Severity, error, sort_problems, warning
from .scan import FolderInfo, ImageItem, ScanLimits, scan_dataset

# Beyond this enlargement an image is mostly interpolation; training on it
# teaches blur, so it has to be replaced or removed rather than warned about.
MAX_UPSCALE = 4.0


@dataclass(frozen=True)
class _Verified:
    item: ImageItem
    bucket: tuple[int, int]
    digest: str | None  # sha256 of the file bytes; None when unreadable
    failure: ImageDecodeError | None  # why it cannot be used, if it cannot


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
) -> Report:
    """Scan and fully decode every image under `root`; list every problem.

    `config` defaults to 512 px aspect buckets; `repeats` counts for images
    outside kohya "N_name" folders (`scan_dataset`). Never raises for bad content;
    raises UserError for invalid options (bad caption extension) and
    `ScanStopped` when the folder walk is refused, too big or cancelled.
    """
    config = config or BucketConfig()
    scan = scan_dataset(root, caption_extension, limits, cancel, repeats)
    problems: list[Problem] = list(scan.problems)
    buckets = make_buckets(config)
    workers = workers or min(4, os.cpu_count() or 1)

    usable: list[ImageItem] = []
    assigned: list[tuple[int, int]] = []
    first_by_digest: dict[str, str] = {}
    rejected: set[str] = set()
    for v in _verify_all(scan.items, config, buckets, workers, progress):
        if v.failure is not None:
            problems.append(error(v.failure.code, v.item.rel_path, v.failure.reason))
            rejected.add(v.item.rel_path)
            continue
        size_problem = _size_problem(v.item, v.bucket, config.resolution)
        if size_problem is not None:
            problems.append(size_problem)
            if size_problem.severity is Severity.ERROR:
                continue
        if v.digest in first_by_digest:
            first = first_by_digest[v.digest]
            problems.append(warning("duplicate", v.item.rel_path,
                                    f"duplicate of {first} (identical content)"))
        elif v.digest is not None:
            first_by_digest[v.digest] = v.item.rel_path
        usable.append(v.item)
        assigned.append(v.bucket)

    # A file that cannot be decoded is reported once, not also for its missing caption.
    problems = [p for p in problems if not (p.code == "missing_caption" and p.path in rejected)]
    problems += _folder_problems(scan.folders, usable, scan.skipped_folders)
    root_failed = any(p.path == DATASET_PATH and p.severity is Severity.ERROR for p in problems)
    if not usable and not root_failed:
        kinds = ", ".join(sorted(SUPPORTED_EXTENSIONS))
        problems.append(error("no_usable_image", DATASET_PATH,
                              f"no usable image found (looked for {kinds} files, "
                              "also in subfolders)"))
    report = bucket_report(zip(assigned, (i.repeats for i in usable), strict=True),
                           config.resolution)
    return Report(root=str(scan.root), resolution=config.resolution,
                  problems=sort_problems(problems), items=usable, buckets=report)


def _verify_all(
    items: list[ImageItem],
    config: BucketConfig,
    buckets: tuple[tuple[int, int], ...],
    workers: int,
    progress: bool,
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
            decode_image(item.path, draft_size=(crop.scaled_w, crop.scaled_h), data=data)
        except ImageDecodeError as exc:
            return _Verified(item, bucket, digest, exc)
        return _Verified(item, bucket, digest, None)

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
        return error("too_small", item.rel_path, (
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
