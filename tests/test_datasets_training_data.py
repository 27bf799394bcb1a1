"""TrainingData: the glue the trainer uses, cached and uncached, resumable."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.errors import UserError
from datasets_tools import (
    BucketConfig,
    CaptionOptions,
    DataOptions,
    LatentCache,
    Position,
    TrainingData,
    check_dataset,
)
from tests.datasets_helpers import save_image, tiny_vae

BUCKETS = BucketConfig(resolution=64, step=16, min_side=32, max_side=128)


@pytest.fixture(scope="module")
def vae():
    return tiny_vae()


def dataset(root: Path) -> list:
    save_image(root / "3_cat" / "a.png", (96, 64), seed=1, caption="cat, a, b, c")
    save_image(root / "3_cat" / "b.png", (64, 96), seed=2, caption="cat, d, e")
    save_image(root / "3_cat" / "c.png", (64, 64), seed=3, caption="cat, f")
    save_image(root / "1_dog" / "d.jpg", (100, 70), seed=4, caption="dog, g")
    report = check_dataset(root, BUCKETS)
    report.raise_if_untrainable()
    return report.items


def test_untrainable_report_raises_user_error_with_the_report(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(b"")
    with pytest.raises(UserError) as info:
        check_dataset(tmp_path, BUCKETS).raise_if_untrainable()
    assert "1 file skipped (not trained on):\n  x.png: empty file (0 bytes)" in str(info.value)
    assert "error    .: no usable image: the only file found is skipped" in str(info.value)
    assert str(info.value).splitlines()[-1].startswith("Not trainable: 1 error")


def test_pixel_batches_are_deterministic_and_resumable(tmp_path: Path) -> None:
    items = dataset(tmp_path)
    options = DataOptions(buckets=BUCKETS, crop="random", flip=True, batch_size=2, seed=5,
                          captions=CaptionOptions(shuffle_tags=True, keep_tokens=1,
                                                  prefix="ohwx"))
    run = list(TrainingData(items, options).batches(epochs=2))
    assert len(run) == 2 * len(TrainingData(items, options))
    again = list(TrainingData(items, options).batches(epochs=2))
    for x, y in zip(run, again, strict=True):
        assert x.batch == y.batch and x.captions == y.captions
        assert torch.equal(x.pixels, y.pixels)
    resumed = list(TrainingData(items, options).batches(start=run[3].batch.next_position,
                                                         epochs=2))
    assert [r.captions for r in resumed] == [r.captions for r in run[4:]]
    assert all(torch.equal(a.pixels, b.pixels) for a, b in zip(resumed, run[4:], strict=True))
    for tb in run:
        assert tb.latents is None and tb.masks is None
        w, h = tb.batch.bucket
        assert tb.pixels.shape == (len(tb.batch.items), 3, h, w)
        assert all(c.startswith(("ohwx, cat, ", "ohwx, dog, ")) for c in tb.captions)


def test_cached_latent_batches_match_the_pixels_they_come_from(tmp_path: Path, vae) -> None:
    items = dataset(tmp_path / "data")
    options = DataOptions(buckets=BUCKETS, flip=True, batch_size=2, seed=1)
    cache = LatentCache(vae, "vae", tmp_path / "cache")
    data = TrainingData(items, options, cache)
    assert data.cache_latents().encoded == 4
    assert TrainingData(items, options, LatentCache(vae, "vae", tmp_path / "cache")
                        ).cache_latents().encoded == 0
    plain = TrainingData(items, options)
    for tb in data.batches(start=Position(1, 0), epochs=2):
        w, h = tb.batch.bucket
        assert tb.pixels is None and tb.latents.shape == (len(tb.batch.items), 4, h // 8, w // 8)
        pixels = plain.load(tb.batch).pixels  # same crop, same flips
        with torch.no_grad():
            expected = vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor
        assert torch.allclose(tb.latents, expected, atol=1e-4)
    assert cache.stats.encoded == 4  # training only read the cache


def test_random_crop_with_cached_latents_is_refused(tmp_path: Path, vae) -> None:
    with pytest.raises(UserError, match="Random crop cannot be combined"):
        TrainingData([], DataOptions(crop="random"), LatentCache(vae, "vae"))


def test_dataset_repeats_change_the_trainers_plan_but_not_a_prefixed_folder(tmp_path: Path
                                                                           ) -> None:
    from trainer.config import load_config
    from trainer.train_setup import check_dataset_or_refuse, data_options, total_steps

    dataset(tmp_path)  # 3_cat: 3 images x 3, 1_dog: 1 image x 1
    save_image(tmp_path / "plain" / "e.png", (64, 64), seed=5, caption="plain, h")
    save_image(tmp_path / "f.png", (64, 64), seed=6, caption="top, i")

    def plan(repeats: int) -> tuple[dict[str, int], int, int]:
        config = load_config(None, [f"dataset.path={str(tmp_path)!r}", "dataset.resolution=64",
                                    "dataset.buckets=false", "train.epochs=2",
                                    f"dataset.repeats={repeats}"])
        items = check_dataset_or_refuse(config).items
        sampler = TrainingData(items, data_options(config, 1)).sampler
        return ({i.rel_path: i.repeats for i in items}, sampler.samples_per_epoch,
                total_steps(config, items, 1))

    counts, samples, steps = plan(5)
    assert counts == {"3_cat/a.png": 3, "3_cat/b.png": 3, "3_cat/c.png": 3, "1_dog/d.jpg": 1,
                      "plain/e.png": 5, "f.png": 5}
    assert (samples, steps) == (9 + 1 + 5 + 5, 2 * 20)
    assert plan(1)[1:] == (9 + 1 + 1 + 1, 2 * 12)
