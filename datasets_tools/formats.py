"""Which files are images, and why one that should be does not open.

Pillow signals a bad file through many exception types depending on the plugin
and on how the file is broken; `DECODE_ERRORS` lists the ones it raises for bad
*content* (found by fuzzing real files), so that nothing else is swallowed.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

SUPPORTED_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
# MPO is what many cameras write into .jpg files (JPEG plus a preview frame).
SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP"})
# Image files a user plausibly drops into a dataset that we do not train on;
# they are reported instead of being ignored like unrelated files.
UNSUPPORTED_EXTENSIONS = frozenset(
    {
        ".gif", ".tif", ".tiff", ".avif", ".heic", ".heif", ".jxl", ".jfif", ".psd",
        ".ico", ".tga", ".jp2", ".j2k", ".svg", ".dng", ".cr2", ".nef", ".arw", ".raw",
    }
)
SUPPORTED_LIST = "JPEG, PNG, WebP or BMP"

DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes UnidentifiedImageError and "image file is truncated"
    SyntaxError,  # Pillow's "not a X file" inside plugins
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
)

_ORIENTATION_TAG = 0x0112
SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})  # rotated by 90 degrees


class ImageDecodeError(Exception):
    """An image that cannot be used; the message is a one-line report reason."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class ImageHeader:
    width: int  # after EXIF orientation, i.e. as the image is shown
    height: int
    format: str
    frames: int


def read_header(path: Path) -> ImageHeader:
    """Size and format from the file header only (no pixel decode).

    Raises ImageDecodeError with a report reason when the file is not a usable image.
    """
    try:
        with Image.open(path) as im:
            if im.format not in SUPPORTED_FORMATS:
                raise ImageDecodeError(
                    "unsupported_format", f"unsupported format {im.format} in a {path.suffix} file "
                    f"(use {SUPPORTED_LIST})"
                )
            width, height = im.size
            if header_orientation(im) in SWAPPING_ORIENTATIONS:
                width, height = height, width
            frames = int(getattr(im, "n_frames", 1))
    except DECODE_ERRORS as exc:
        raise classify_decode_error(path, exc) from exc
    if width <= 0 or height <= 0:
        raise ImageDecodeError("corrupt", "corrupt image (cannot be decoded)")
    return ImageHeader(width, height, im.format, frames)


def header_orientation(im: Image.Image) -> int:
    """EXIF orientation without decoding pixels (1 when absent or unreadable)."""
    # PNG's getexif() decodes the whole image when eXIf comes after the pixel data.
    if im.format == "PNG" and "exif" not in im.info:
        return 1
    try:
        value = im.getexif().get(_ORIENTATION_TAG, 1)
    except DECODE_ERRORS:
        return 1  # a broken EXIF block must not make a fine image unusable
    return value if isinstance(value, int) else 1


def classify_decode_error(path: Path, exc: BaseException) -> ImageDecodeError:
    """Turn a Pillow failure into a stable one-line reason for the report."""
    if isinstance(exc, Image.DecompressionBombError):
        return ImageDecodeError(
            "too_large", "image too large to decode safely (over Pillow's pixel limit)")
    if isinstance(exc, OSError) and exc.errno is not None:  # the OS, not Pillow, failed
        return ImageDecodeError("unreadable", f"cannot be read ({exc.strerror or exc})")
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            f.seek(0, 2)
            length = f.tell()
            f.seek(max(0, length - 16))
            tail = f.read()
    except OSError as read_exc:
        return ImageDecodeError("unreadable", f"cannot be read ({read_exc.strerror or read_exc})")
    kind = _magic_kind(head)
    if kind is None:
        if isinstance(exc, UnidentifiedImageError):
            return ImageDecodeError(
                "not_an_image", "not an image (the content is not a known image format)")
        return ImageDecodeError("corrupt", "corrupt image (cannot be decoded)")
    if "truncated" in str(exc) or _looks_truncated(kind, head, tail, length):
        return ImageDecodeError("truncated", "truncated image (the file ends early)")
    return ImageDecodeError("corrupt", "corrupt image (cannot be decoded)")


def _magic_kind(head: bytes) -> str | None:
    if head.startswith(b"\xff\xd8"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head.startswith(b"BM"):
        return "BMP"
    return None


def _looks_truncated(kind: str, head: bytes, tail: bytes, length: int) -> bool:
    """Structural end-of-file checks: a cut file misses its end marker or declared size."""
    if kind == "JPEG":
        return b"\xff\xd9" not in tail
    if kind == "PNG":
        return b"IEND" not in tail
    if kind == "WEBP" and len(head) >= 8:
        return length < struct.unpack("<I", head[4:8])[0] + 8
    if kind == "BMP" and len(head) >= 6:
        return length < struct.unpack("<I", head[2:6])[0]
    return False
