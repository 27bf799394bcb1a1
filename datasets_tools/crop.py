"""Where an image is cut: scale to cover the target size, then a center or random box.

Pure PIL and arithmetic (no torch), so the check and the CLI stay quick to start.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image

from .buckets import Size


@dataclass(frozen=True)
class CropSpec:
    """Scale the displayed image to (scaled_w, scaled_h), then cut the target box.

    It fully determines the pixels fed to the VAE, so it is part of the latent
    cache key (a different crop must never reuse a latent).
    """

    target_w: int
    target_h: int
    scaled_w: int
    scaled_h: int
    left: int
    top: int

    @property
    def target(self) -> Size:
        return (self.target_w, self.target_h)

    def key(self) -> str:
        return (f"{self.target_w}x{self.target_h}@{self.scaled_w}x{self.scaled_h}"
                f"+{self.left}+{self.top}")


def compute_crop(
    size: Size, target: Size, mode: str = "center", rng: random.Random | None = None
) -> CropSpec:
    """Scale `size` just enough to cover `target`, then place the crop box.

    mode "center" is deterministic; mode "random" draws the offset from `rng`.
    """
    width, height = size
    target_w, target_h = target
    scale = max(target_w / width, target_h / height)
    # max() guards against rounding leaving the scaled image one pixel short.
    scaled_w = max(target_w, round(width * scale))
    scaled_h = max(target_h, round(height * scale))
    if mode == "center":
        left, top = (scaled_w - target_w) // 2, (scaled_h - target_h) // 2
    elif mode == "random":
        if rng is None:
            raise ValueError("random crop needs an rng")
        left, top = rng.randint(0, scaled_w - target_w), rng.randint(0, scaled_h - target_h)
    else:
        raise ValueError(f"unknown crop mode {mode!r} (use 'center' or 'random')")
    return CropSpec(target_w, target_h, scaled_w, scaled_h, left, top)


def apply_crop(image: Image.Image, spec: CropSpec) -> Image.Image:
    if image.size != (spec.scaled_w, spec.scaled_h):
        image = image.resize((spec.scaled_w, spec.scaled_h), Image.Resampling.LANCZOS)
    box = (spec.left, spec.top, spec.left + spec.target_w, spec.top + spec.target_h)
    return image.crop(box)
