"""Training sizes: a fixed square, or aspect-ratio buckets of about the same area.

All functions here are pure: the same sizes and config give the same buckets,
so the trainer, the check and the latent cache agree without sharing state.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from core.errors import UserError

Size = tuple[int, int]  # (width, height) in pixels
VAE_FACTOR = 8  # the SD VAE downsamples by 8, so every side must be a multiple of it


@dataclass(frozen=True)
class BucketConfig:
    resolution: int = 512
    enabled: bool = True  # False: every image is cropped to resolution x resolution
    step: int = 64
    min_side: int = 256
    max_side: int = 1024
    no_upscale: bool = False  # never enlarge: each image gets a bucket inside its own size

    def __post_init__(self) -> None:
        if self.resolution <= 0 or self.resolution % VAE_FACTOR:
            raise UserError(
                f"Resolution {self.resolution} is not a positive multiple of {VAE_FACTOR}; "
                "use a value such as 512."
            )
        if not self.enabled:
            return
        if self.step <= 0 or self.step % VAE_FACTOR:
            raise UserError(
                f"Bucket step {self.step} is not a positive multiple of {VAE_FACTOR}; "
                "use 64 (or 32)."
            )
        for name, value in (("resolution", self.resolution), ("minimum bucket side",
                            self.min_side), ("maximum bucket side", self.max_side)):
            if value % self.step:
                raise UserError(
                    f"The {name} {value} is not a multiple of the bucket step {self.step}."
                )
        if not 0 < self.min_side <= self.resolution <= self.max_side:
            raise UserError(
                f"Bucket sides must satisfy 0 < minimum ({self.min_side}) <= resolution "
                f"({self.resolution}) <= maximum ({self.max_side})."
            )

    @property
    def max_area(self) -> int:
        return self.resolution * self.resolution


def make_buckets(config: BucketConfig) -> tuple[Size, ...]:
    """All bucket sizes, sorted: sides on the step grid within [min, max], area <= res^2.

    For each width the tallest height that keeps the area budget is taken, so
    every bucket uses close to resolution^2 pixels.
    """
    if not config.enabled:
        return ((config.resolution, config.resolution),)
    sizes: set[Size] = set()
    for width in range(config.min_side, config.max_side + 1, config.step):
        height = min(config.max_side, config.max_area // width // config.step * config.step)
        if height >= config.min_side:
            sizes.add((width, height))
            sizes.add((height, width))
    return tuple(sorted(sizes))


def aspect_distance(size: Size, bucket: Size) -> float:
    """Distance of aspect ratios on a log scale, so 2:1 and 1:2 are equally far from 1:1."""
    return abs(math.log(size[0] / size[1]) - math.log(bucket[0] / bucket[1]))


def nearest_bucket(size: Size, buckets: Sequence[Size]) -> Size:
    """The bucket whose aspect ratio is nearest; ties go to the larger area, then wider."""
    return min(buckets, key=lambda b: (aspect_distance(size, b), -b[0] * b[1], -b[0]))


def assign_bucket(size: Size, config: BucketConfig, buckets: Sequence[Size] | None = None) -> Size:
    """Training size for an image of `size` (as displayed, width x height)."""
    if not config.enabled:
        return (config.resolution, config.resolution)
    if config.no_upscale:
        return _own_size_bucket(size, config)
    return nearest_bucket(size, buckets if buckets is not None else make_buckets(config))


def _own_size_bucket(size: Size, config: BucketConfig) -> Size:
    # The image is only ever shrunk (to the area budget and the maximum side),
    # then its sides are rounded down to the grid, so it covers its bucket with
    # a crop of less than one step; it is enlarged only up to the minimum side.
    width, height = size
    scale = min(1.0, math.sqrt(config.max_area / (width * height)),
                config.max_side / width, config.max_side / height)
    step = config.step
    # The epsilon keeps 511.9999 (float error on an exact 512) from rounding down a step.
    bucket_w = max(config.min_side, int(width * scale / step + 1e-6) * step)
    bucket_h = max(config.min_side, int(height * scale / step + 1e-6) * step)
    while bucket_w * bucket_h > config.max_area:  # only after raising a side to the minimum
        if bucket_w >= bucket_h:
            bucket_w -= step
        else:
            bucket_h -= step
    return (bucket_w, bucket_h)


def upscale_factor(size: Size, bucket: Size) -> float:
    """How much an image is enlarged to cover its bucket (<= 1 means no enlargement)."""
    return max(bucket[0] / size[0], bucket[1] / size[1])


@dataclass(frozen=True)
class BucketRow:
    size: Size
    images: int
    samples: int  # images x repeats: how many times the bucket is used per epoch


@dataclass(frozen=True)
class BucketReport:
    resolution: int
    rows: tuple[BucketRow, ...]

    def format_text(self) -> str:
        lines = [f"Buckets (resolution {self.resolution}): images, samples per epoch"]
        for row in self.rows:
            label = f"{row.size[0]}x{row.size[1]}"
            lines.append(f"  {label:<10} {row.images:>6} {row.samples:>8}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "resolution": self.resolution,
            "buckets": [
                {"width": r.size[0], "height": r.size[1], "images": r.images,
                 "samples": r.samples}
                for r in self.rows
            ],
        }


def bucket_report(assignments: Iterable[tuple[Size, int]], resolution: int) -> BucketReport:
    """Count images and samples per bucket from (bucket, repeats) pairs."""
    images: Counter[Size] = Counter()
    samples: Counter[Size] = Counter()
    for bucket, repeats in assignments:
        images[bucket] += 1
        samples[bucket] += repeats
    rows = tuple(BucketRow(b, images[b], samples[b]) for b in sorted(images))
    return BucketReport(resolution, rows)
