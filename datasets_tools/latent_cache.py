"""VAE latents computed once per (image content, crop, VAE), in memory or on disk.

The key covers everything that decides the latent: the image bytes (SHA-256),
the crop (target size, scaled size, offset), the VAE identity string given by
the caller, the VAE dtype and the pixel-pipeline version below. A changed image
or model therefore never reuses a stale latent, and an unchanged one is never
encoded twice.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from PIL import Image
from tqdm import tqdm

from core.errors import UserError
from core.hashing import file_sha256

from .formats import ImageDecodeError
from .masks import MASK_VERSION, to_grid, with_file_mask
from .store import TensorStore
from .transform import CropSpec, PreparedImage, crop_pixels, to_prepared

# Bump when decoding, resizing or cropping changes: old latents then stop matching.
PIPELINE_VERSION = "latent-v1"

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class LatentRequest:
    path: Path
    crop: CropSpec
    flip: bool = False  # also cache the latent of the mirrored crop
    mask: bool = False  # also cache the loss mask at latent resolution (masked loss)
    mask_file: Path | None = None  # the mask's file; None: the image's alpha channel


@dataclass
class LatentEntry:
    latent: torch.Tensor  # C x h x w, already multiplied by the VAE scaling factor
    flipped: torch.Tensor | None = None
    mask: torch.Tensor | None = None  # 1 x h x w in [0, 1]

    def pick(self, flip: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Latent and mask for a sample, mirrored when the sampler says so."""
        if not flip:
            return self.latent, self.mask
        if self.flipped is None:
            raise ValueError("this entry was cached without its flipped variant")
        mask = torch.flip(self.mask, dims=[-1]) if self.mask is not None else None
        return self.flipped, mask


@dataclass
class CacheStats:
    encoded: int = 0  # images run through the VAE
    reused: int = 0  # entries served from the cache
    discarded: int = 0  # bad cache files deleted (then rebuilt)


class LatentCache:
    def __init__(
        self,
        vae: Any,
        vae_id: str,
        cache_dir: str | os.PathLike[str] | None = None,
        *,
        progress: bool = False,
    ) -> None:
        """`vae`: a diffusers AutoencoderKL; `vae_id`: changes whenever its weights do
        (see `hashing.module_identity`); `cache_dir` None keeps latents in memory."""
        self.vae = vae
        self.vae_id = vae_id
        self.store = TensorStore(cache_dir, PIPELINE_VERSION)
        self.progress = progress
        self.stats = CacheStats()
        self._digests: dict[tuple[str, int, int], str] = {}
        param = next(vae.parameters())
        self._device, self._dtype = param.device, param.dtype

    def key(self, request: LatentRequest) -> str:
        parts = (PIPELINE_VERSION, self._content_digest(request.path), request.crop.key(),
                 self.vae_id, str(self._dtype))
        if request.mask:
            # A masked entry is its own entry: a mask file that changes, or the alpha
            # replacing a file, never reuses a mask cached for the other.
            source = self._content_digest(request.mask_file) if request.mask_file else "alpha"
            parts += (MASK_VERSION, source)
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()

    def get(self, request: LatentRequest) -> LatentEntry:
        """The cached entry, encoding it first if it is missing or unusable."""
        key = self.key(request)
        entry = self._load(key, request)
        if entry is None:
            prepared = _prepared(_crop(request), request)
            entry = self._encode_batch([(key, request)], [prepared])[0]
        return entry

    def build(self, requests: Iterable[LatentRequest], batch_size: int = 1) -> CacheStats:
        """Make sure every request is cached; returns what this call did."""
        before = CacheStats(**vars(self.stats))
        missing: dict[tuple[int, int], list[tuple[str, LatentRequest]]] = {}
        seen: set[str] = set()
        for request in requests:
            key = self.key(request)
            if key in seen or self._load(key, request) is not None:
                continue
            seen.add(key)
            missing.setdefault(request.crop.target, []).append((key, request))
        total = sum(len(group) for group in missing.values())
        with tqdm(total=total, desc="Caching latents", unit="img",
                  disable=not self.progress) as bar:
            for group in missing.values():  # one size per batch: the VAE needs equal shapes
                # Decode the next images in threads while the VAE works on this batch.
                with closing(_prefetch(_crop, [request for _, request in group])) as images:
                    for start in range(0, len(group), batch_size):
                        batch = group[start:start + batch_size]
                        prepared = [_prepared(next(images), r) for _, r in batch]
                        self._encode_batch(batch, prepared)
                        bar.update(len(batch))
        return CacheStats(self.stats.encoded - before.encoded, self.stats.reused - before.reused,
                          self.stats.discarded - before.discarded)

    def _content_digest(self, path: Path) -> str:
        st = os.stat(path)
        memo = (str(path), st.st_size, st.st_mtime_ns)
        if memo not in self._digests:
            self._digests[memo] = file_sha256(path)
        return self._digests[memo]

    def _load(self, key: str, request: LatentRequest) -> LatentEntry | None:
        discarded = self.store.discarded
        tensors = self.store.load(key)
        self.stats.discarded += self.store.discarded - discarded
        if tensors is None or "latent" not in tensors:
            return None
        if (request.flip and "flipped" not in tensors) or (request.mask and "mask" not in tensors):
            return None  # cached without a variant that is now needed: encode again
        self.stats.reused += 1
        return LatentEntry(tensors["latent"], tensors.get("flipped"), tensors.get("mask"))

    def _encode_batch(
        self, batch: list[tuple[str, LatentRequest]], prepared: list[PreparedImage]
    ) -> list[LatentEntry]:
        pixels = [p.pixels for p in prepared]
        flips = [torch.flip(p.pixels, dims=[-1]) for (_, r), p in zip(batch, prepared, strict=True)
                 if r.flip]
        latents = self._encode(torch.stack(pixels + flips))
        flipped_iter = iter(latents[len(pixels):])
        entries = []
        for i, ((key, request), p) in enumerate(zip(batch, prepared, strict=True)):
            entry = LatentEntry(latents[i].clone())
            if request.flip:
                entry.flipped = next(flipped_iter).clone()
            if request.mask and p.mask is not None:
                entry.mask = to_grid(p.mask, tuple(entry.latent.shape[-2:]))
            tensors = {name: t for name, t in (("latent", entry.latent), ("flipped", entry.flipped),
                                               ("mask", entry.mask)) if t is not None}
            self.store.save(key, tensors, {"source": request.path.name, "vae_id": self.vae_id})
            entries.append(entry)
        self.stats.encoded += len(batch)
        return entries

    @torch.no_grad()
    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(self._device, self._dtype)
        # The mode (mean) instead of a sample: the same image always gives the same latent.
        z = self.vae.encode(x).latent_dist.mode()
        shift = getattr(self.vae.config, "shift_factor", None)
        if shift is not None:
            z = z - shift
        return (z * self.vae.config.scaling_factor).to("cpu")


def _crop(request: LatentRequest) -> tuple[Image.Image, CropSpec]:
    try:
        return crop_pixels(request.path, request.crop, keep_alpha=request.mask)
    except ImageDecodeError as exc:
        raise UserError(
            f"{request.path}: {exc.reason}. Run `python -m datasets_tools check` on the dataset."
        ) from exc


def _prepared(cropped: tuple[Image.Image, CropSpec], request: LatentRequest) -> PreparedImage:
    # The cache keeps the unmirrored mask; `LatentEntry.pick` mirrors it with the latent.
    mask_file = request.mask_file if request.mask else None
    return with_file_mask(to_prepared(*cropped, request.mask), mask_file, flip=False)


def _prefetch(fn: Callable[[T], R], items: list[T], ahead: int = 2) -> Iterator[R]:
    """Map in worker threads (Pillow decodes without the GIL), in order, bounded look-ahead."""
    with ThreadPoolExecutor(max_workers=ahead) as pool:
        pending: deque[Future[R]] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
