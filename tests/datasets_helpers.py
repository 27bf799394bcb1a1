"""Image and model factories for the datasets_tools tests (everything is generated)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def noise_image(size: tuple[int, int], seed: int = 0, mode: str = "RGB") -> Image.Image:
    """Random pixels: every seed gives different file content (distinct hashes)."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if channels == 1 else arr)


def save_image(
    path: Path, size: tuple[int, int] = (64, 64), seed: int = 0, caption: str | None = None,
    **save_args: object,
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    noise_image(size, seed).save(path, **save_args)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def with_exif_orientation(path: Path, image: Image.Image, orientation: int) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, exif=exif)
    return path


def sixteen_bit_grey_png(path: Path, size: tuple[int, int], value: int) -> Path:
    arr = np.full((size[1], size[0]), value, dtype=np.uint16)
    Image.fromarray(arr).save(path)  # Pillow writes mode I;16 as a 16-bit PNG
    return path


def tiny_vae(seed: int = 0):  # -> AutoencoderKL
    """SD-shaped VAE (4 blocks: downsampling 8, 4 latent channels) with tiny widths."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
        sample_size=64,
    )
    return vae.eval()
