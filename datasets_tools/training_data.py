"""The trainer's view: checked items in, ready batches (latents or pixels + captions) out.

It ties the pure pieces together so that the crop used for caching is the crop
used for training, and every random choice of a sample (caption shuffle,
dropout, random crop, flip) comes from (seed, epoch, batch, slot): resuming at
a `Position` replays exactly the batches an uninterrupted run would see.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from core.errors import UserError

from .buckets import BucketConfig, Size, assign_bucket, make_buckets
from .captions import CaptionOptions, CaptionProcessor
from .crop import CropSpec, compute_crop
from .formats import ImageDecodeError
from .latent_cache import CacheStats, LatentCache, LatentRequest
from .masks import mask_file, with_file_mask
from .regularization import plan_reg
from .sampler import Batch, BucketBatchSampler, Position, sample_rng
from .scan import ImageItem
from .transform import PreparedImage, prepare_image


@dataclass(frozen=True)
class DataOptions:
    buckets: BucketConfig = field(default_factory=BucketConfig)
    crop: str = "center"  # or "random" (not with cached latents: a latent fixes its crop)
    flip: bool = False  # random horizontal mirroring, 50% per sample
    keep_alpha: bool = False  # masked loss: return each image's loss mask (datasets_tools.masks)
    mask_dir: Path | None = None  # masked loss: mask files by image name; else the alpha channel
    captions: CaptionOptions = field(default_factory=CaptionOptions)
    batch_size: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.crop not in ("center", "random"):
            raise UserError(f"Crop mode {self.crop!r} is unknown; use 'center' or 'random'.")
        if self.batch_size < 1:
            raise UserError(f"Batch size {self.batch_size} is invalid; use 1 or more.")


@dataclass
class TrainingBatch:
    batch: Batch  # indices, bucket, flips; `batch.next_position` is the resume point
    captions: list[str]
    latents: torch.Tensor | None  # B x 4 x H/8 x W/8, scaled, when a latent cache is used
    pixels: torch.Tensor | None  # B x 3 x H x W in [-1, 1] otherwise
    masks: torch.Tensor | None  # B x 1 x (latent or pixel size) with keep_alpha, in [0, 1]
    is_reg: tuple[bool, ...] = ()  # per sample: a regularization image (dataset.reg_path)


class TrainingData:
    def __init__(
        self,
        items: Sequence[ImageItem],
        options: DataOptions | None = None,
        latent_cache: LatentCache | None = None,
        reg_items: Sequence[ImageItem] = (),
    ) -> None:
        """`items`: `Report.items` of a trainable check; `latent_cache` None: load pixels;
        `reg_items`: the reg folder's checked items, balanced against `items` by kohya's
        rule (datasets_tools/regularization.py) and mixed into the same batches."""
        self.reg_plan = plan_reg(sum(i.repeats for i in items), [i.repeats for i in reg_items])
        self.items = list(items) + [reg_items[k] for k in self.reg_plan.used]
        self.repeats = [i.repeats for i in items] + list(self.reg_plan.repeats)
        self.is_reg = [False] * len(items) + [True] * len(self.reg_plan.used)
        self.options = options or DataOptions()
        if latent_cache is not None and self.options.crop == "random":
            raise UserError(
                "Random crop cannot be combined with cached latents (a cached latent holds one "
                "fixed crop); use center crop or turn latent caching off."
            )
        self.latent_cache = latent_cache
        self.captions = CaptionProcessor(self.options.captions)
        # The trigger word is what the adapter learns; on the class images it
        # would teach the class to answer to it, the opposite of regularizing.
        self.reg_captions = CaptionProcessor(replace(self.options.captions, prefix=""))
        # Mask files are named after training images; a reg image's mask is its alpha.
        self.mask_files = [mask_file(i.rel_path, None if reg else self.options.mask_dir)
                           if self.options.keep_alpha else None
                           for i, reg in zip(self.items, self.is_reg, strict=True)]
        all_buckets = make_buckets(self.options.buckets)
        self.buckets: list[Size] = [
            assign_bucket((i.width, i.height), self.options.buckets, all_buckets)
            for i in self.items
        ]
        self.sampler = BucketBatchSampler(
            self.buckets, self.repeats, self.options.batch_size,
            self.options.seed, flip=self.options.flip,
        )

    def __len__(self) -> int:
        """Batches per epoch."""
        return len(self.sampler)

    def latent_requests(self) -> list[LatentRequest]:
        """One request per image (center crop), flip and mask variants as configured."""
        return self._requests(range(len(self.items)))

    def cache_latents(self, batch_size: int = 1) -> CacheStats:
        if self.latent_cache is None:
            raise ValueError("no latent cache was given")
        return self.latent_cache.build(self.latent_requests(), batch_size=batch_size)

    def batches(self, start: Position | None = None, epochs: int | None = None
                ) -> Iterator[TrainingBatch]:
        for batch in self.sampler.iterate(start, epochs):
            yield self.load(batch)

    def load(self, batch: Batch) -> TrainingBatch:
        seed = self.options.seed
        captions = [
            (self.reg_captions if self.is_reg[i] else self.captions)(
                self.items[i].caption, sample_rng(seed, batch.epoch, batch.index, slot))
            for slot, i in enumerate(batch.items)
        ]
        is_reg = tuple(self.is_reg[i] for i in batch.items)
        if self.latent_cache is not None:
            picked = [self.latent_cache.get(request).pick(flip) for request, flip in
                      zip(self._requests(batch.items), batch.flips, strict=True)]
            latents = torch.stack([latent for latent, _ in picked])
            masks = self._stack_masks([mask for _, mask in picked])
            return TrainingBatch(batch, captions, latents, None, masks, is_reg)
        prepared = []
        for slot, (i, flip) in enumerate(zip(batch.items, batch.flips, strict=True)):
            rng = sample_rng(seed, batch.epoch, batch.index, slot, "crop")
            crop = (self._center_crop(i) if self.options.crop == "center" else
                    compute_crop(self._size(i), self.buckets[i], "random", rng))
            prepared.append(self._prepare(i, crop, flip))
        pixels = torch.stack([p.pixels for p in prepared])
        masks = self._stack_masks([p.mask for p in prepared])
        return TrainingBatch(batch, captions, None, pixels, masks, is_reg)

    def _requests(self, indices: Sequence[int]) -> list[LatentRequest]:
        return [LatentRequest(self.items[i].path, self._center_crop(i), flip=self.options.flip,
                              mask=self.options.keep_alpha, mask_file=self.mask_files[i])
                for i in indices]

    def _size(self, index: int) -> Size:
        return (self.items[index].width, self.items[index].height)

    def _center_crop(self, index: int) -> CropSpec:
        return compute_crop(self._size(index), self.buckets[index], "center")

    def _prepare(self, index: int, crop: CropSpec, flip: bool) -> PreparedImage:
        item = self.items[index]
        try:
            prepared = prepare_image(item.path, crop, flip=flip,
                                     keep_alpha=self.options.keep_alpha)
        except ImageDecodeError as exc:  # changed on disk after the check
            raise UserError(f"{item.path}: {exc.reason}. Run the dataset check again.") from exc
        return with_file_mask(prepared, self.mask_files[index], flip)

    def _stack_masks(self, masks: list[torch.Tensor | None]) -> torch.Tensor | None:
        if not self.options.keep_alpha or any(m is None for m in masks):
            return None
        return torch.stack(masks)  # type: ignore[arg-type]
