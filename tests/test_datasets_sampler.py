"""Bucket batch sampler: determinism, repeats, one bucket per batch, exact resume."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datasets_tools import BucketBatchSampler, Position, sample_rng

A, B, C = (512, 512), (640, 384), (384, 640)
BUCKETS = [A, A, A, B, B, C, A, B, C, A]
REPEATS = [1, 2, 3, 1, 5, 1, 1, 2, 4, 1]


def make(seed: int = 1, **kwargs) -> BucketBatchSampler:
    return BucketBatchSampler(BUCKETS, REPEATS, kwargs.pop("batch_size", 3), seed, **kwargs)


def test_same_seed_same_batches_other_seed_or_epoch_differs() -> None:
    assert make(seed=1).batches(0) == make(seed=1).batches(0)
    assert make(seed=1).batches(0) != make(seed=2).batches(0)
    assert make(seed=1).batches(0) != make(seed=1).batches(1)


def test_an_epoch_is_every_item_times_its_repeats_once() -> None:
    sampler = make()
    for epoch in range(3):
        counts = Counter(i for batch in sampler.batches(epoch) for i in batch.items)
        assert counts == {i: r for i, r in enumerate(REPEATS)}
    assert sampler.samples_per_epoch == sum(REPEATS) == 21
    # A: 1+2+3+1+1 = 8 -> 3 batches; B: 1+5+2 = 8 -> 3; C: 1+4 = 5 -> 2
    assert len(sampler) == len(sampler.batches(0)) == 8


def test_every_batch_holds_one_bucket_and_batch_size_items_at_most() -> None:
    for batch in make().batches(0):
        assert {BUCKETS[i] for i in batch.items} == {batch.bucket}
        assert 1 <= len(batch.items) <= 3
    assert [b.index for b in make().batches(4)] == list(range(8))


def test_drop_last_drops_partial_batches() -> None:
    sampler = make(drop_last=True)
    batches = sampler.batches(0)
    assert all(len(b.items) == 3 for b in batches)
    assert len(sampler) == len(batches) == 2 + 2 + 1
    assert sampler.samples_per_epoch == 15


def test_flips_are_seeded_and_off_unless_asked() -> None:
    assert all(not any(b.flips) for b in make().batches(0))
    flips = [f for e in range(5) for b in make(flip=True).batches(e) for f in b.flips]
    assert 0.3 < sum(flips) / len(flips) < 0.7
    assert make(flip=True).batches(2) == make(flip=True).batches(2)


def test_resume_mid_epoch_continues_exactly() -> None:
    sampler = make(flip=True)
    uninterrupted = list(sampler.iterate(epochs=3))
    assert len(uninterrupted) == 24
    done = uninterrupted[10]  # trained on batch 10, then the run stopped
    resumed = list(make(flip=True).iterate(start=done.next_position, epochs=3))
    assert resumed == uninterrupted[11:]
    # Resuming right after the last batch of an epoch starts the next epoch.
    last_of_epoch0 = uninterrupted[7]
    assert last_of_epoch0.next_position == Position(0, 8)
    assert next(sampler.iterate(start=Position(0, 8))) == uninterrupted[8]
    assert list(itertools.islice(sampler.iterate(), 24)) == uninterrupted  # endless by default


def test_sample_rng_is_a_pure_function_of_its_arguments() -> None:
    a = [sample_rng(1, 2, 3, 4).random() for _ in range(2)]
    assert a[0] == a[1]
    assert sample_rng(1, 2, 3, 4).random() != sample_rng(1, 2, 3, 5).random()
    assert sample_rng(1, 2, 3, 4, "crop").random() != sample_rng(1, 2, 3, 4).random()


@settings(max_examples=60, deadline=None)
@given(items=st.lists(st.tuples(st.sampled_from([A, B, C]), st.integers(0, 4)), max_size=30),
       batch_size=st.integers(1, 5), seed=st.integers(0, 2**32))
def test_repeats_counted_right_for_any_dataset(items, batch_size, seed) -> None:
    buckets = [b for b, _ in items]
    repeats = [r for _, r in items]
    sampler = BucketBatchSampler(buckets, repeats, batch_size, seed)
    batches = sampler.batches(0)
    assert Counter(i for b in batches for i in b.items) == {
        i: r for i, r in enumerate(repeats) if r}
    assert len(batches) == len(sampler)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        BucketBatchSampler([A], [1, 2], 1, 0)
    with pytest.raises(ValueError):
        BucketBatchSampler([A], [1], 0, 0)


def test_empty_dataset_yields_nothing_instead_of_hanging() -> None:
    sampler = BucketBatchSampler([A], [0], 2, 0)
    assert len(sampler) == 0 and list(sampler.iterate()) == []
