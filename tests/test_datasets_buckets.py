"""Aspect-ratio buckets: properties over random configs and image sizes (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import UserError
from datasets_tools import (
    BucketConfig,
    assign_bucket,
    bucket_report,
    make_buckets,
    nearest_bucket,
    upscale_factor,
)
from datasets_tools.buckets import aspect_distance


@st.composite
def configs(draw, no_upscale: bool = False) -> BucketConfig:
    step = draw(st.sampled_from([8, 16, 32, 64]))
    res_steps = draw(st.integers(2, 24))
    min_steps = draw(st.integers(1, res_steps))
    max_steps = draw(st.integers(res_steps, res_steps * 3))
    return BucketConfig(resolution=res_steps * step, step=step, min_side=min_steps * step,
                        max_side=max_steps * step, no_upscale=no_upscale)


sizes = st.tuples(st.integers(1, 8000), st.integers(1, 8000))


def assert_valid_bucket(bucket: tuple[int, int], config: BucketConfig) -> None:
    for side in bucket:
        assert side % config.step == 0
        assert config.min_side <= side <= config.max_side
    assert bucket[0] * bucket[1] <= config.resolution ** 2


@settings(max_examples=300, deadline=None)
@given(config=configs(), size=sizes)
def test_every_bucket_is_valid_and_each_image_gets_the_nearest(config, size) -> None:
    buckets = make_buckets(config)
    assert (config.resolution, config.resolution) in buckets
    for bucket in buckets:
        assert_valid_bucket(bucket, config)
    chosen = assign_bucket(size, config, buckets)
    assert chosen in buckets
    best = min(aspect_distance(size, b) for b in buckets)
    assert aspect_distance(size, chosen) <= best + 1e-12


@settings(max_examples=300, deadline=None)
@given(config=configs(no_upscale=True), size=sizes)
def test_no_upscale_buckets_are_valid_and_never_enlarge(config, size) -> None:
    bucket = assign_bucket(size, config)
    assert_valid_bucket(bucket, config)
    if min(size) >= config.min_side:  # only images below the minimum side must grow
        assert upscale_factor(size, bucket) <= 1.0 + 1e-9


def test_sd_defaults_match_the_usual_bucket_list() -> None:
    buckets = make_buckets(BucketConfig())
    # Same construction as kohya's make_bucket_resolutions: 17 sizes at 512/64/256/1024.
    assert buckets == (
        (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640),
        (448, 576), (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256),
        (896, 256), (960, 256), (1024, 256))
    assert assign_bucket((1920, 1080), BucketConfig()) == (640, 384)
    assert assign_bucket((1080, 1920), BucketConfig()) == (384, 640)
    assert assign_bucket((3000, 3000), BucketConfig()) == (512, 512)


def test_fixed_resolution_and_no_upscale_examples() -> None:
    assert make_buckets(BucketConfig(enabled=False)) == ((512, 512),)
    assert assign_bucket((300, 900), BucketConfig(enabled=False)) == (512, 512)
    small = BucketConfig(no_upscale=True)
    assert assign_bucket((400, 300), small) == (384, 256)  # own size, rounded down to 64
    assert assign_bucket((2000, 1000), small) == (704, 320)  # shrunk to 512^2 area first


def test_ties_prefer_the_larger_bucket() -> None:
    assert nearest_bucket((100, 100), [(64, 64), (128, 128)]) == (128, 128)


@pytest.mark.parametrize("kwargs", [
    {"resolution": 500}, {"step": 60}, {"min_side": 100}, {"min_side": 576},
    {"max_side": 448}, {"resolution": 0},
])
def test_invalid_configs_are_user_errors(kwargs) -> None:
    with pytest.raises(UserError):
        BucketConfig(**kwargs)


def test_bucket_report_counts_images_and_samples() -> None:
    report = bucket_report([((512, 512), 10), ((512, 512), 1), ((640, 384), 2)], 512)
    assert [(r.size, r.images, r.samples) for r in report.rows] == [
        ((512, 512), 2, 11), ((640, 384), 1, 2)]
    assert report.format_text().splitlines() == [
        "Buckets (resolution 512): images, samples per epoch",
        "  512x512         2       11",
        "  640x384         1        2",
    ]
    assert report.to_dict()["buckets"][1] == {"width": 640, "height": 384, "images": 1,
                                              "samples": 2}
