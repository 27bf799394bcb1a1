"""Text-encoder outputs cached per caption, for runs that do not train the text encoder.

Keyed by the exact caption text and an encoder identity. Only worth it when
captions do not change between epochs (`CaptionProcessor.is_random` is False);
with shuffling every variant is a new entry.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Sequence

import torch

from .latent_cache import CacheStats
from .store import TensorStore

TEXT_FORMAT = "text-v1"

EncodeFn = Callable[[list[str]], torch.Tensor]  # N captions -> tensor with N rows


class TextEmbeddingCache:
    def __init__(
        self,
        encode: EncodeFn,
        encoder_id: str,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        """`encode` runs the (frozen) text encoder on a list of captions; `encoder_id`
        must change whenever the tokenizer, weights or output layer (clip skip) do."""
        self.encode = encode
        self.encoder_id = encoder_id
        self.store = TensorStore(cache_dir, TEXT_FORMAT)
        self.stats = CacheStats()

    def key(self, caption: str) -> str:
        parts = (TEXT_FORMAT, self.encoder_id, caption)
        return hashlib.sha256("\0".join(parts).encode("utf-8", "surrogatepass")).hexdigest()

    def get(self, caption: str) -> torch.Tensor:
        return self.get_many([caption])[0]

    def get_many(self, captions: Sequence[str]) -> torch.Tensor:
        """Embeddings for `captions`, stacked; missing ones are encoded in one call."""
        found: dict[str, torch.Tensor] = {}
        missing: list[str] = []
        for caption in dict.fromkeys(captions):  # unique, order kept
            tensor = self._load(caption)
            if tensor is None:
                missing.append(caption)
            else:
                found[caption] = tensor
        if missing:
            found.update(self._encode(missing))
        return torch.stack([found[c] for c in captions])

    def build(self, captions: Iterable[str], batch_size: int = 16) -> CacheStats:
        before = CacheStats(**vars(self.stats))
        missing = [c for c in dict.fromkeys(captions) if self._load(c) is None]
        for start in range(0, len(missing), batch_size):
            self._encode(missing[start:start + batch_size])
        return CacheStats(self.stats.encoded - before.encoded, self.stats.reused - before.reused,
                          self.stats.discarded - before.discarded)

    def _load(self, caption: str) -> torch.Tensor | None:
        discarded = self.store.discarded
        tensors = self.store.load(self.key(caption))
        self.stats.discarded += self.store.discarded - discarded
        if tensors is None or "embedding" not in tensors:
            return None
        self.stats.reused += 1
        return tensors["embedding"]

    def _encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            output = self.encode(list(captions))
        if output.shape[0] != len(captions):
            raise ValueError(f"encode returned {output.shape[0]} rows for {len(captions)} captions")
        result = {}
        for caption, row in zip(captions, output, strict=True):
            row = row.detach().to("cpu").clone()
            self.store.save(self.key(caption), {"embedding": row}, {"encoder_id": self.encoder_id})
            result[caption] = row
        self.stats.encoded += len(captions)
        return result
