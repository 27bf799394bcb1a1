"""Dataset scan and full check on generated images of mixed sizes and formats, CPU.

Generates N images (default 1,000: JPEG, PNG, WebP and BMP, sides 256 to
2048 px, in kohya `N_name` folders, most with captions) into a temporary
folder, then times `scan_dataset` (headers only) and `check_dataset` (every
image decoded, hashed and bucketed).

    python -m bench.dataset_scan [--count N] [--repeats R] [--keep DIR]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from datasets_tools import BucketConfig, check_dataset, scan_dataset

# (extension, share, largest side): PNG/BMP stay smaller, as in real datasets
FORMATS = ((".jpg", 0.6, 2048), (".png", 0.2, 1024), (".webp", 0.15, 1024), (".bmp", 0.05, 512))


def generate(root: Path, count: int, seed: int = 0) -> int:
    """Write `count` images; returns the total bytes written."""
    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    # Smooth content (upscaled noise) compresses like photos and encodes fast.
    base = Image.fromarray(np_rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))
    base = base.resize((2048, 2048), Image.Resampling.BICUBIC)
    folders = ["10_subject", "4_style", "1_misc", "2_extra/nested"]
    total = 0
    for i in range(count):
        ext, largest = _pick_format(rng)
        w, h = rng.randint(256, largest), rng.randint(256, largest)
        left, top = rng.randint(0, 2048 - w), rng.randint(0, 2048 - h)
        image = base.crop((left, top, left + w, top + h))
        folder = root / folders[i % len(folders)]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img{i:05d}{ext}"
        image.save(path, quality=90) if ext in (".jpg", ".webp") else image.save(path)
        if i % 10:  # every tenth image has no caption
            path.with_suffix(".txt").write_text(f"subject, tag{i % 7}, tag{i % 13}")
        total += path.stat().st_size
    return total


def _pick_format(rng: random.Random) -> tuple[str, int]:
    r, acc = rng.random(), 0.0
    for ext, share, largest in FORMATS:
        acc += share
        if r < acc:
            return ext, largest
    return FORMATS[0][0], FORMATS[0][2]


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="generate into (or reuse) this folder")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-scan-") as tmp:
        root = args.keep or Path(tmp)
        if not any(root.glob("*/*")):
            start = time.perf_counter()
            size = generate(root, args.count)
            print(f"generated {args.count} images, {size / 1e6:.0f} MB, "
                  f"in {time.perf_counter() - start:.1f} s")
        result = scan_dataset(root)
        print(f"scan found {len(result.items)} images, {len(result.problems)} problems")
        scan_times = timed(lambda: scan_dataset(root), args.repeats)
        print(f"scan_dataset:  median {statistics.median(scan_times):.3f} s "
              f"(runs: {', '.join(f'{t:.3f}' for t in scan_times)})")
        report = check_dataset(root, BucketConfig())
        print(f"check found {len(report.items)} usable, trainable={report.trainable}")
        check_times = timed(lambda: check_dataset(root, BucketConfig()), 1)
        print(f"check_dataset: {check_times[0]:.2f} s "
              f"({len(report.items) / check_times[0]:.0f} images/s, full decode + SHA-256)")


if __name__ == "__main__":
    main()
