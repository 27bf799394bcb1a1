"""Decode one image file into 8-bit RGB (or RGBA) pixels as it is meant to be seen."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .formats import (
    DECODE_ERRORS,
    SUPPORTED_FORMATS,
    SUPPORTED_LIST,
    SWAPPING_ORIENTATIONS,
    ImageDecodeError,
    classify_decode_error,
    header_orientation,
)

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_WIDE_GREY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
WHITE = (255, 255, 255, 255)


def decode_image(
    path: Path,
    *,
    keep_alpha: bool = False,
    draft_size: tuple[int, int] | None = None,
    data: bytes | None = None,
) -> Image.Image:
    """Fully decode `path` (first frame), apply EXIF orientation, return RGB or RGBA.

    RGBA is returned only with `keep_alpha` and an image that has transparency;
    otherwise transparency is composited on white. `draft_size` (width, height as
    displayed) lets JPEG decode at a reduced scale that still covers that size,
    which is several times faster for large photos. `data` avoids a second read
    when the caller already holds the file bytes. Raises ImageDecodeError.
    """
    source = io.BytesIO(data) if data is not None else path
    try:
        with Image.open(source) as im:
            if im.format not in SUPPORTED_FORMATS:
                raise ImageDecodeError(
                    "unsupported_format", f"unsupported format {im.format} (use {SUPPORTED_LIST})")
            if draft_size is not None and im.format in ("JPEG", "MPO"):
                want = draft_size
                if header_orientation(im) in SWAPPING_ORIENTATIONS:
                    want = (draft_size[1], draft_size[0])
                im.draft(im.mode, want)
            im.load()
            oriented = _exif_transpose(im)
            return _to_rgb(oriented, keep_alpha)
    except DECODE_ERRORS as exc:
        raise classify_decode_error(path, exc) from exc


def _exif_transpose(im: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(im)
    except DECODE_ERRORS:
        # Broken EXIF must not cost the user an image whose pixels are fine.
        return im.copy()


def _to_rgb(im: Image.Image, keep_alpha: bool) -> Image.Image:
    if im.mode in _WIDE_GREY_MODES:
        im = _wide_grey_to_l(im)
    has_alpha = im.mode in _ALPHA_MODES or "transparency" in im.info
    if not has_alpha:
        return im if im.mode == "RGB" else im.convert("RGB")
    rgba = im.convert("RGBA")
    if keep_alpha:
        return rgba
    white = Image.new("RGBA", rgba.size, WHITE)
    return Image.alpha_composite(white, rgba).convert("RGB")


def _wide_grey_to_l(im: Image.Image) -> Image.Image:
    # Pillow's convert("RGB") clips 16-bit values at 255, turning the image white.
    arr = np.asarray(im, dtype=np.float64)
    peak = 65535.0 if im.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
    scaled = np.clip(np.rint(arr * (255.0 / peak)), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled)
