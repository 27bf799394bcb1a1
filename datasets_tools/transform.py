"""From an image file to the tensor the VAE sees: decode, crop, flip, scale to [-1, 1]."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .crop import CropSpec, apply_crop, compute_crop
from .loading import decode_image

__all__ = ["CropSpec", "PreparedImage", "alpha_mask", "apply_crop", "compute_crop",
           "crop_pixels", "prepare_image", "to_prepared", "to_tensor"]


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> float32 CHW tensor in [-1, 1]."""
    arr = np.array(image.convert("RGB"), dtype=np.uint8)  # copy: torch wants writable memory
    # contiguous(): hand the VAE the standard NCHW layout rather than a permuted view.
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous().float().div_(127.5).sub_(1.0)


def alpha_mask(image: Image.Image) -> torch.Tensor:
    """1 x H x W float mask in [0, 1] from the alpha channel (all ones without alpha)."""
    if image.mode != "RGBA":
        return torch.ones(1, image.height, image.width)
    arr = np.array(image.getchannel("A"), dtype=np.uint8)
    return torch.from_numpy(arr).float().div_(255.0).unsqueeze(0)


@dataclass
class PreparedImage:
    pixels: torch.Tensor  # 3 x H x W, float32 in [-1, 1]
    mask: torch.Tensor | None  # 1 x H x W in [0, 1] when keep_alpha was asked for
    crop: CropSpec


def crop_pixels(
    path: Path,
    crop: CropSpec,
    *,
    flip: bool = False,
    keep_alpha: bool = False,
    data: bytes | None = None,
) -> tuple[Image.Image, CropSpec]:
    """The cropped (and mirrored) image: RGB, or RGBA when keep_alpha and it has alpha;
    with the crop actually applied (`crop`, unless the file's real size disagreed).

    PIL only, no torch, so it can run in worker threads while the VAE runs:
    torch work stays on the main thread and does not compete with its thread pool.
    """
    image = decode_image(
        path, keep_alpha=keep_alpha, draft_size=(crop.scaled_w, crop.scaled_h), data=data
    )
    if _aspect_mismatch(image.size, (crop.scaled_w, crop.scaled_h)):
        # The header size the crop was planned on was wrong (e.g. a PNG whose EXIF
        # rotation sits after the pixel data): re-plan rather than distort.
        crop = compute_crop(image.size, crop.target, "center")
    image = apply_crop(image, crop)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image, crop


def _aspect_mismatch(actual: tuple[int, int], planned: tuple[int, int]) -> bool:
    # 5% tolerance: JPEG draft decoding rounds sides up by up to a pixel or so.
    return abs(actual[0] * planned[1] - actual[1] * planned[0]) > 0.05 * actual[0] * planned[1]


def to_prepared(image: Image.Image, crop: CropSpec, keep_alpha: bool) -> PreparedImage:
    """Tensors from a `crop_pixels` result; transparent areas are shown on white."""
    mask = alpha_mask(image) if keep_alpha else None
    if image.mode == "RGBA":
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image)
    return PreparedImage(to_tensor(image), mask, crop)


def prepare_image(
    path: Path,
    crop: CropSpec,
    *,
    flip: bool = False,
    keep_alpha: bool = False,
    data: bytes | None = None,
) -> PreparedImage:
    """Decode, scale, crop and optionally mirror one image. Raises ImageDecodeError.

    Pixels are composited on white; with keep_alpha the alpha channel is also
    returned as the loss mask.
    """
    image, applied = crop_pixels(path, crop, flip=flip, keep_alpha=keep_alpha, data=data)
    return to_prepared(image, applied, keep_alpha)
