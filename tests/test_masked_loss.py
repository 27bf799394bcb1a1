"""dataset.masked_loss / dataset.mask_path: the mask weights the loss where it
should, follows its image's pixels through crop, flip, bucket resize and the
latent caches, is checked file by file, and a masked run trains and exports."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.errors import UserError
from datasets_tools.buckets import BucketConfig
from datasets_tools.check import check_dataset
from datasets_tools.latent_cache import LatentCache
from datasets_tools.masks import to_grid
from datasets_tools.training_data import DataOptions, TrainingData
from tests.datasets_helpers import tiny_vae
from trainer import diffusion
from trainer.config import PRESETS_DIR, load_config

PRESET = PRESETS_DIR / "cpu-demo.toml"


def region_image(path: Path, size: tuple[int, int], box: tuple[int, int, int, int],
                 alpha: bool = True, caption: str = "a red box") -> Path:
    """Red inside `box` (opaque), blue outside (transparent when `alpha`): wherever
    the pixels end up, red marks exactly the pixels the mask should keep."""
    width, height = size
    arr = np.zeros((height, width, 4), dtype=np.uint8)
    arr[..., 2], arr[..., 3] = 255, 0 if alpha else 255
    left, top, right, bottom = box
    arr[top:bottom, left:right] = (255, 0, 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr if alpha else arr[..., :3]).save(path)
    path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def grey_mask(path: Path, size: tuple[int, int], box=None, value: int = 255) -> Path:
    arr = np.zeros((size[1], size[0]), dtype=np.uint8)
    if box is None:
        arr[:] = value
    else:
        arr[box[1]:box[3], box[0]:box[2]] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


# ---- the loss -------------------------------------------------------------------------------

def test_zero_mask_gives_zero_gradient_there_and_half_mask_halves_the_weight() -> None:
    generator = torch.Generator().manual_seed(0)
    prediction = torch.randn(2, 4, 8, 8, generator=generator, requires_grad=True)
    target = torch.randn(2, 4, 8, 8, generator=generator)
    full = diffusion.per_sample_mse(prediction, target)
    (full_grad,) = torch.autograd.grad(full.sum(), prediction)

    left_out = torch.ones(2, 1, 64, 64)  # at pixel size: averaged down to the 8 x 8 grid
    left_out[..., :32] = 0
    (grad,) = torch.autograd.grad(diffusion.per_sample_mse(prediction, target, left_out).sum(),
                                  prediction)
    assert torch.count_nonzero(grad[..., :4]) == 0
    assert torch.equal(grad[..., 4:], full_grad[..., 4:])

    half = diffusion.per_sample_mse(prediction, target, torch.full((2, 1, 8, 8), 0.5))
    (half_grad,) = torch.autograd.grad(half.sum(), prediction)
    torch.testing.assert_close(half, full / 2)
    torch.testing.assert_close(half_grad, full_grad / 2)
    # As kohya: averaged over all pixels, so a mask of ones changes nothing.
    assert torch.equal(diffusion.per_sample_mse(prediction, target, torch.ones(2, 1, 8, 8)), full)


class _Recording(torch.nn.Module):
    """The U-Net, keeping its predictions' gradients for the test to read."""

    def __init__(self, unet) -> None:
        super().__init__()
        self.unet, self.predictions = unet, []

    def forward(self, *args):
        out = self.unet(*args)
        out.sample.retain_grad()
        self.predictions.append(out.sample)
        return out


def test_the_trainers_loss_ignores_masked_out_latent_pixels(tmp_path, one_torch_thread) -> None:
    from trainer import train_setup as setup
    from trainer.step_loss import StepContext, step_generator, training_loss

    for i in range(2):  # RGB: the masks below are set by hand
        region_image(tmp_path / "data" / f"{i}.png", (64, 64), (0, 0, 32 + 16 * i, 64),
                     alpha=False)
    config = load_config(PRESET, [f"dataset.path={json.dumps(str(tmp_path / 'data'))}",
                                  "dataset.masked_loss=true"])
    report = check_dataset(tmp_path / "data", setup.bucket_config(config), masked_loss=True,
                           mask_dir=None)
    assert [p.code for p in report.problems] == ["no_masks"]
    sd = setup.load_model(config, torch.device("cpu"))
    network = setup.build_network(config, sd)
    try:
        tb = next(TrainingData(report.items, setup.data_options(config, 2)).batches())
        assert tb.masks is not None and torch.equal(tb.masks, torch.ones(2, 1, 64, 64))
        ctx = StepContext(torch.device("cpu"), "no")
        ctx.unet = recording = _Recording(sd.unet)

        def loss(masks):
            return training_loss(config, sd, network, dataclasses.replace(tb, masks=masks),
                                 slice(0, 2), step_generator(0, 0, 0), False, ctx)

        unmasked = loss(None)
        assert torch.equal(loss(tb.masks), unmasked)
        torch.testing.assert_close(loss(torch.full_like(tb.masks, 0.5)), unmasked / 2)
        left_out = tb.masks.clone()
        left_out[..., :32] = 0
        loss(left_out).backward()
        grad = recording.predictions[-1].grad
        assert grad.shape[-2:] == (8, 8)
        assert torch.count_nonzero(grad[..., :4]) == 0 and torch.count_nonzero(grad[..., 4:]) > 0
    finally:
        network.detach()


# ---- the mask follows the pixels --------------------------------------------------------------

BUCKETS = BucketConfig(resolution=64, step=16, min_side=32, max_side=128)
BOX = (10, 20, 70, 60)  # not centred, not aligned to the 8 px grid


@pytest.fixture
def masked_sets(tmp_path) -> dict[str, tuple[Path, Path | None]]:
    """The same region as alpha, and as a mask file for an RGB image (wide: bucket + crop)."""
    size = (150, 80)
    region_image(tmp_path / "alpha" / "wide.png", size, BOX)
    region_image(tmp_path / "file" / "1_x" / "wide.png", size, BOX, alpha=False)
    grey_mask(tmp_path / "masks" / "1_x" / "wide.webp", size, BOX)
    return {"alpha": (tmp_path / "alpha", None), "file": (tmp_path / "file", tmp_path / "masks")}


@pytest.mark.parametrize("source", ["alpha", "file"])
def test_the_mask_keeps_exactly_the_region_through_crop_flip_and_bucket(
    masked_sets, source, tmp_path
) -> None:
    root, mask_dir = masked_sets[source]
    report = check_dataset(root, BUCKETS, masked_loss=True, mask_dir=mask_dir)
    assert report.trainable and not report.problems, report.format_text()
    options = DataOptions(buckets=BUCKETS, flip=True, keep_alpha=True, mask_dir=mask_dir, seed=3)
    seen = {}
    for crop in ("center", "random"):
        data = TrainingData(report.items, dataclasses.replace(options, crop=crop))
        for tb in data.batches(epochs=4):
            # Red (1, -1, -1) only inside the box; blue, or white where transparent, outside.
            red = (tb.pixels[0, 0] > 0) & (tb.pixels[0, 2] < 0)
            mask = tb.masks[0, 0]
            assert mask.shape == red.shape == tuple(reversed(tb.batch.bucket))
            # Resampling blurs the boundary by a pixel; everywhere else they agree.
            assert torch.all((mask > 0.9) <= red) and torch.all((mask < 0.1) <= ~red)
            assert 0.2 < float(mask.mean()) < 0.8
            seen[(crop, tb.batch.flips[0])] = mask
    assert set(seen) == {(c, f) for c in ("center", "random") for f in (False, True)}
    torch.testing.assert_close(seen["center", True], torch.flip(seen["center", False], [-1]))

    # Cached latents, in memory and on disk: the cached mask is the pixel mask on the
    # latent grid, mirrored with its latent.
    vae = tiny_vae()
    for folder in (None, tmp_path / "cache"):
        for attempt in range(2 if folder else 1):
            cache = LatentCache(vae, "tiny-vae", folder)
            data = TrainingData(report.items, options, cache)
            stats = data.cache_latents()
            assert (stats.encoded, stats.reused) == ((0, 1) if attempt else (1, 0))
            for tb in data.batches(epochs=4):
                expected = to_grid(seen["center", tb.batch.flips[0]][None, None],
                                   tuple(tb.latents.shape[-2:]))
                torch.testing.assert_close(tb.masks, expected)


def test_the_disk_cache_key_changes_with_the_mask_source(masked_sets, tmp_path) -> None:
    root, mask_dir = masked_sets["file"]
    item = check_dataset(root, BUCKETS, masked_loss=True, mask_dir=mask_dir).items[0]
    data = TrainingData([item], DataOptions(buckets=BUCKETS, keep_alpha=True, mask_dir=mask_dir))
    request = data.latent_requests()[0]
    cache = LatentCache(tiny_vae(), "tiny-vae", tmp_path / "cache")
    keys = {cache.key(request), cache.key(dataclasses.replace(request, mask=False)),
            cache.key(dataclasses.replace(request, mask_file=None))}
    grey_mask(request.mask_file, (150, 80), value=128)  # the mask file is edited
    keys.add(cache.key(request))
    assert len(keys) == 4


# ---- the check -------------------------------------------------------------------------------

def test_the_check_names_each_bad_or_missing_mask(tmp_path) -> None:
    data, masks = tmp_path / "data", tmp_path / "data" / "masks"  # inside: left out of the scan
    for i, name in enumerate(("good", "alpha", "none", "small", "broken", "twice")):
        region_image(data / f"{name}.png", (64, 64), (i, i, 40, 40), alpha=name == "alpha")
    grey_mask(masks / "good.png", (64, 64), BOX)
    grey_mask(masks / "small.png", (32, 32))
    (masks / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    grey_mask(masks / "twice.png", (64, 64))
    grey_mask(masks / "twice.jpg", (64, 64))
    report = check_dataset(data, BUCKETS, masked_loss=True, mask_dir=masks)
    found = {(p.path, p.severity.value, p.code) for p in report.problems}
    assert found == {("none.png", "warning", "no_mask"),
                     ("small.png", "skipped", "mask_size"),
                     ("broken.png", "skipped", "bad_mask"),
                     ("twice.png", "skipped", "ambiguous_mask")}
    assert sorted(i.rel_path for i in report.items) == ["alpha.png", "good.png", "none.png"]
    text = report.format_text()
    assert "small.png" in text and "is 32x32 but the image is 64x64" in text
    assert str(masks / "broken.png") in text and "twice.jpg, twice.png" in text

    # The command line gives the same report. Without masked loss the mask folder is
    # not one, and its files are images like any other.
    from datasets_tools.cli import main

    assert main(["check", str(data), "--resolution", "64", "--no-buckets",
                 "--mask-path", str(masks)]) == 0
    assert main(["check", str(tmp_path / "nowhere"), "--mask-path", str(masks)]) == 1
    assert main(["check", str(data), "--mask-path", str(tmp_path / "nope")]) == 2
    plain = check_dataset(data, BUCKETS)
    assert {"masks/good.png", "masks/twice.jpg"} <= {i.rel_path for i in plain.items}


def test_masked_loss_without_any_mask_is_refused_naming_the_settings(tmp_path) -> None:
    region_image(tmp_path / "a.png", (64, 64), BOX, alpha=False)
    report = check_dataset(tmp_path, BUCKETS, masked_loss=True)
    assert not report.trainable and [p.code for p in report.problems] == ["no_masks"]
    assert "dataset.masked_loss" in report.errors[0].reason
    with pytest.raises(UserError, match="does not exist"):
        check_dataset(tmp_path, BUCKETS, masked_loss=True, mask_dir=tmp_path / "nope")
    with pytest.raises(UserError, match="is the dataset folder itself"):
        check_dataset(tmp_path, BUCKETS, masked_loss=True, mask_dir=tmp_path)


def test_config_rules_for_the_mask_settings(tmp_path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text('[dataset]\npath = "demo"\nmasked_loss = true\nmask_path = "masks"\n')
    assert load_config(toml).dataset.mask_path == str(tmp_path / "masks")
    with pytest.raises(UserError, match="dataset.mask_path .* without dataset.masked_loss"):
        load_config(PRESET, ['dataset.mask_path="masks"'])
    from trainer.train_setup import check_dataset_or_refuse

    lcm = load_config(PRESET, ['task="lcm_distill"', "dataset.masked_loss=true"])
    with pytest.raises(UserError, match='does not apply to task = "lcm_distill"'):
        check_dataset_or_refuse(lcm)


# ---- a real run -------------------------------------------------------------------------------

@pytest.mark.parametrize("cache", ["disk", "off"])
def test_a_short_masked_run_trains_and_exports(tmp_path, monkeypatch, cache,
                                               one_torch_thread) -> None:
    from trainer.train import run

    monkeypatch.setenv("LORA_TRAINER_CACHE", str(tmp_path / "cache"))
    for i, box in enumerate([(0, 0, 48, 48), (16, 16, 64, 64)]):
        region_image(tmp_path / "data" / f"{i}.png", (64, 64), box)
    out = tmp_path / "out"
    config = load_config(PRESET, [f"dataset.path={json.dumps(str(tmp_path / 'data'))}",
                                  "dataset.masked_loss=true", f'dataset.cache_latents="{cache}"',
                                  "dataset.flip=true", "train.steps=2",
                                  "sample.every_n_steps=0", f"output.dir={json.dumps(str(out))}"])
    result = run(config)
    assert result.steps_done == 2 and len(result.losses) == 2
    assert all(np.isfinite(result.losses)) and Path(result.final_file).is_file()
    from safetensors import safe_open

    with safe_open(str(result.final_file), "pt") as exported:
        assert exported.metadata()["ss_masked_loss"] == "True"  # as kohya writes it
    if cache == "disk":  # the masks were cached with their latents
        files = list((tmp_path / "cache" / "latents").rglob("*.safetensors"))
        assert len(files) == 2
        for file in files:
            with safe_open(str(file), "pt") as f:
                assert {"latent", "flipped", "mask"} <= set(f.keys())
