"""Loss masks (masked loss): where an image's mask comes from, checking it, and
cutting it exactly like its image.

A mask is a same-named grayscale file in the mask folder (white = train,
black = ignore, grey = partial weight) or, without one, the image's alpha
channel; an image with neither trains on every pixel (the check warns). The
mask is cut by the crop that cut its image (`CropSpec`, the one actually
applied), mirrored with it, then averaged down to the latent grid ("area"
interpolation, as kohya's `apply_masked_loss`), so a latent pixel's weight is
the mean of the 8 x 8 image pixels it was encoded from.

Where this differs from kohya sd-scripts (`--masked_loss`, `--alpha_mask`,
`conditioning_data_dir`): a mask file's grey value (luminance) is the weight
where kohya reads its red channel (the same for grayscale masks, and a
coloured mask cannot weigh by one arbitrary channel); the alpha channel is used
without a second switch whenever an image has no mask file, since a mask file
per image is the rarer setup and an RGBA image's transparency is what the user
drew; and a mask of another size than its image skips that image in the check,
where kohya's assertion stops the whole run at its first batch.

The check half (finding and verifying files) is PIL only: the check stays
torch-free; the tensor half imports torch lazily.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from .crop import CropSpec, apply_crop
from .formats import SUPPORTED_EXTENSIONS, ImageDecodeError
from .loading import decode_image
from .report import Problem, skipped, warning

if TYPE_CHECKING:
    import torch

    from .scan import ScanResult
    from .transform import PreparedImage

# Part of the latent cache key of masked entries: bump when masks are made differently.
MASK_VERSION = "mask-v1"
_EXTENSIONS = tuple(sorted(SUPPORTED_EXTENSIONS))


@dataclass(frozen=True)
class MaskCheck:
    problem: Problem | None  # None: the mask is fine
    usable: bool  # the image stays in the dataset
    has_mask: bool  # a mask file or alpha will weight its loss


def candidates(rel_path: str, mask_dir: Path) -> list[Path]:
    """Mask files for the image at `rel_path` (relative to the dataset): the same
    stem, any supported extension, in the same subfolder of `mask_dir` (kohya
    "N_name" folders mirrored) or directly in `mask_dir`."""
    rel = PurePosixPath(rel_path)
    folders = [mask_dir / rel.parent] if rel.parent != PurePosixPath(".") else []
    for folder in [*folders, mask_dir]:
        found = [folder / f"{rel.stem}{ext}" for ext in _EXTENSIONS
                 if (folder / f"{rel.stem}{ext}").is_file()]
        if found:
            return found
    return []


def mask_file(rel_path: str, mask_dir: Path | None) -> Path | None:
    """The one mask file of an image, or None (then its alpha channel is the mask).
    Several candidates are refused by the check, so the trainer never sees them."""
    if mask_dir is None:
        return None
    found = candidates(rel_path, mask_dir)
    return found[0] if len(found) == 1 else None


def load_mask_image(path: Path):  # -> PIL.Image.Image, mode "L"
    """A mask file as 8-bit grey, EXIF-oriented like images. Raises ImageDecodeError."""
    return decode_image(path).convert("L")


def check_mask(rel_path: str, size: tuple[int, int], has_alpha: bool,
               mask_dir: Path | None) -> MaskCheck:
    """Whether the image at `rel_path` (displayed `size`) has a usable mask."""
    found = candidates(rel_path, mask_dir) if mask_dir is not None else []
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        return MaskCheck(skipped("ambiguous_mask", rel_path, (
            f"several mask files match ({names} in {found[0].parent}); keep one")), False, False)
    if not found:
        if has_alpha:
            return MaskCheck(None, True, True)
        where = f"no file of that name in {mask_dir} and " if mask_dir is not None else ""
        return MaskCheck(warning("no_mask", rel_path, (
            f"no mask ({where}no alpha channel): trained on every pixel")), True, False)
    try:
        mask = load_mask_image(found[0])
    except ImageDecodeError as exc:
        return MaskCheck(skipped("bad_mask", rel_path, f"mask {found[0]}: {exc.reason}"),
                         False, False)
    if mask.size != size:
        return MaskCheck(skipped("mask_size", rel_path, (
            f"mask {found[0]} is {mask.size[0]}x{mask.size[1]} but the image is "
            f"{size[0]}x{size[1]}; make the mask the image's size")), False, False)
    return MaskCheck(None, True, True)


def file_mask(path: Path, crop: CropSpec, flip: bool) -> torch.Tensor:
    """1 x H x W in [0, 1] from a mask file, cut by the crop its image was cut by."""
    import numpy as np
    import torch
    from PIL import Image

    try:
        image = apply_crop(load_mask_image(path), crop)
    except ImageDecodeError as exc:  # changed on disk after the check
        from core.errors import UserError

        raise UserError(f"mask {path}: {exc.reason}. Run the dataset check again.") from exc
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.array(image, dtype=np.uint8)
    return torch.from_numpy(arr).float().div_(255.0).unsqueeze(0)


def with_file_mask(prepared: PreparedImage, path: Path | None, flip: bool) -> PreparedImage:
    """`prepared` with its mask taken from `path` (None: keep the alpha mask)."""
    if path is None:
        return prepared
    from .transform import PreparedImage

    return PreparedImage(prepared.pixels, file_mask(path, prepared.crop, flip), prepared.crop)


def to_grid(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Masks (N x 1 x H x W, or 1 x H x W) averaged down to `size` (h, w)."""
    import torch.nn.functional as F

    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    single = mask.dim() == 3
    grid = F.interpolate(mask[None] if single else mask, size=size, mode="area")
    return grid[0] if single else grid


def mask_folder(mask_dir: str | os.PathLike[str] | None) -> Path | None:
    """The mask folder as a Path; UserError when it is given but is not a folder."""
    if mask_dir is None or str(mask_dir) == "":
        return None
    folder = Path(mask_dir)
    if not folder.is_dir():
        from core.errors import UserError

        raise UserError(
            f"The mask folder {folder} (dataset.mask_path, --mask-path) "
            f"{'is not a folder' if folder.exists() else 'does not exist'}; give the folder "
            "that holds the masks, or leave it empty to take masks from the alpha channel."
        )
    return folder


def leave_out_mask_folder(scan: ScanResult, mask_dir: Path | None) -> None:
    """A mask folder inside the dataset holds masks, not training images: its files
    and folders leave the scan (else every mask would train as an image)."""
    if mask_dir is None:
        return
    try:
        rel = mask_dir.resolve().relative_to(scan.root.resolve()).as_posix()
    except ValueError:
        return  # outside the dataset
    if rel == ".":  # a mask would be named like its image: it would be its own mask
        from core.errors import UserError

        raise UserError(
            f"The mask folder {mask_dir} (dataset.mask_path, --mask-path) is the dataset folder "
            "itself; put the masks in a folder of their own (a subfolder is fine).")

    def inside(path: str) -> bool:
        return path == rel or path.startswith(rel + "/")

    scan.items = [i for i in scan.items if not inside(i.rel_path)]
    scan.problems = [p for p in scan.problems if not inside(p.path)]
    scan.folders = [f for f in scan.folders if not inside(f.rel_path)]
    scan.skipped_folders.add(rel)


def no_mask_at_all(mask_dir: Path | None) -> Problem:
    from .report import DATASET_PATH, error

    files = f"nor a mask file in {mask_dir}" if mask_dir is not None else (
        "and no mask folder is given (dataset.mask_path, --mask-path)")
    return error("no_masks", DATASET_PATH, (
        "masked loss is on (dataset.masked_loss, --masked-loss) but no usable image has a "
        f"mask: none has an alpha channel {files}; add masks, or turn masked loss off"))
