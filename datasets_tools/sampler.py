"""Batches of item indices, one bucket per batch, as a pure function of (seed, epoch).

Nothing is carried from one batch to the next, so resuming is exact: a
checkpoint stores `Position(epoch, batch)` and `iterate(start=...)` continues
with the very batches (and flips, and per-sample random streams) an
uninterrupted run would have produced.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from .buckets import Size


@dataclass(frozen=True, order=True)
class Position:
    epoch: int
    batch: int  # index of the next batch within the epoch


@dataclass(frozen=True)
class Batch:
    epoch: int
    index: int  # within the epoch
    bucket: Size
    items: tuple[int, ...]  # indices into the item list given to the sampler
    flips: tuple[bool, ...]  # mirror sample i horizontally

    @property
    def next_position(self) -> Position:
        """Where to resume after this batch has been trained on."""
        return Position(self.epoch, self.index + 1)


def sample_rng(
    seed: int, epoch: int, batch: int, slot: int, purpose: str = "caption"
) -> random.Random:
    """Independent random stream for one sample (caption shuffle, random crop, ...).

    String seeds are hashed with SHA-512 by `random`, so the stream is stable
    across processes and Python runs (unlike hash()).
    """
    return random.Random(f"{purpose}:{seed}:{epoch}:{batch}:{slot}")


class BucketBatchSampler:
    """Every item appears `repeats[i]` times per epoch; each batch holds one bucket."""

    def __init__(
        self,
        buckets: Sequence[Size],
        repeats: Sequence[int],
        batch_size: int,
        seed: int,
        *,
        flip: bool = False,
        drop_last: bool = False,
    ) -> None:
        if len(buckets) != len(repeats):
            raise ValueError("buckets and repeats must have one entry per item")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if any(r < 0 for r in repeats):
            raise ValueError("repeats cannot be negative")
        self.batch_size = batch_size
        self.seed = seed
        self.flip = flip
        self.drop_last = drop_last
        by_bucket: dict[Size, list[int]] = defaultdict(list)
        for index, (bucket, count) in enumerate(zip(buckets, repeats, strict=True)):
            by_bucket[bucket].extend([index] * count)
        # Sorted so the order of the input list is the only thing that matters.
        self._pools = {bucket: tuple(pool) for bucket, pool in sorted(by_bucket.items()) if pool}

    @property
    def samples_per_epoch(self) -> int:
        return sum(self._count(len(pool)) for pool in self._pools.values())

    def _count(self, n: int) -> int:
        return n - n % self.batch_size if self.drop_last else n

    def __len__(self) -> int:
        """Batches per epoch (the same for every epoch)."""
        rounding = math.floor if self.drop_last else math.ceil
        return sum(rounding(len(pool) / self.batch_size) for pool in self._pools.values())

    def batches(self, epoch: int) -> list[Batch]:
        rng = random.Random(f"batches:{self.seed}:{epoch}")
        groups: list[tuple[Size, list[int]]] = []
        for bucket, pool in self._pools.items():
            order = list(pool)
            rng.shuffle(order)
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                if len(chunk) == self.batch_size or not self.drop_last:
                    groups.append((bucket, chunk))
        rng.shuffle(groups)  # interleave buckets so no size dominates a stretch of steps
        result = []
        for index, (bucket, chunk) in enumerate(groups):
            flips = tuple(rng.random() < 0.5 if self.flip else False for _ in chunk)
            result.append(Batch(epoch, index, bucket, tuple(chunk), flips))
        return result

    def iterate(
        self, start: Position | None = None, epochs: int | None = None
    ) -> Iterator[Batch]:
        """Batches from `start` (default: the beginning) through epoch `epochs - 1`
        (forever when None)."""
        start = start or Position(0, 0)
        if len(self) == 0:
            return  # nothing to yield, and an endless loop over empty epochs would hang
        epoch, skip = start.epoch, start.batch
        while epochs is None or epoch < epochs:
            yield from self.batches(epoch)[skip:]
            epoch, skip = epoch + 1, 0
