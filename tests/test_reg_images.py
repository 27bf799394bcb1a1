"""Regularization images: dataset.reg_path and train.prior_loss_weight (kohya
reg_data_dir / prior_loss_weight): the balancing rule, the batches, the loss
weight, the caches, resume and the metadata."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from core.errors import UserError
from datasets_tools.buckets import BucketConfig
from datasets_tools.captions import CaptionOptions
from datasets_tools.check import check_dataset
from datasets_tools.regularization import plan_reg
from datasets_tools.sampler import Batch
from datasets_tools.training_data import DataOptions, TrainingData
from tests.datasets_helpers import save_image
from tests.test_train import config_for, metrics

BUCKETS = BucketConfig(resolution=64, enabled=False)


def kohya_loop(train_samples: int, reg_repeats: list[int]) -> list[int]:
    """sd-scripts DreamBoothDataset.__init__'s loop, transcribed: the repeats each
    registered reg image ends up with."""
    registered: list[int] = []
    n, first_loop = 0, True
    while n < train_samples:
        for k, repeats in enumerate(reg_repeats):
            if first_loop:
                registered.append(repeats)
                n += repeats
            else:
                registered[k] += 1
                n += 1
            if n >= train_samples:
                break
        first_loop = False
    return registered


@pytest.mark.parametrize("train_samples", [1, 5, 6, 36, 37])
@pytest.mark.parametrize("reg_repeats", [[1], [1, 1, 1], [2, 2, 2, 2, 2, 2, 2], [3, 1, 2],
                                         [1] * 50, [10, 1]])
def test_the_plan_is_kohyas_balancing_loop(train_samples, reg_repeats):
    plan = plan_reg(train_samples, reg_repeats)
    assert list(plan.repeats) == kohya_loop(train_samples, reg_repeats)
    assert plan.used == tuple(range(len(plan.repeats)))
    assert plan.reg_samples >= train_samples
    assert plan.unused == len(reg_repeats) - len(plan.used)


def test_the_plan_cycles_few_images_and_cuts_many():
    assert plan_reg(10, [1, 1, 1]).repeats == (4, 3, 3)  # cycled, the first ones once more
    cut = plan_reg(5, [2] * 10)  # whole images with their repeats: 6 >= 5, 7 unused
    assert (cut.repeats, cut.reg_samples, cut.unused) == ((2, 2, 2), 6, 7)
    assert plan_reg(4, []).used == () and plan_reg(0, [1]).used == ()


def _folder(root: Path, name: str, count: int, seed: int, caption: str | None) -> Path:
    for k in range(count):
        save_image(root / name / f"{k}.png", seed=seed + k, caption=caption)
    return root


@pytest.mark.parametrize("reg_folder, reg_images, expected", [
    ("1_person", 2, [3, 3]),  # 6 training samples from 2 images: each cycled 3 times
    ("3_person", 5, [3, 3]),  # the first two (3 + 3 = 6) are used, the other three never
])
def test_every_epoch_has_the_planned_reg_samples(tmp_path, reg_folder, reg_images, expected):
    train = check_dataset(_folder(tmp_path / "train", "2_sks person", 3, 0, None), BUCKETS)
    reg = check_dataset(_folder(tmp_path / "reg", reg_folder, reg_images, 50, None), BUCKETS)
    assert [i.repeats for i in reg.items] == [int(reg_folder[0])] * reg_images
    data = TrainingData(train.items, DataOptions(buckets=BUCKETS, batch_size=4, seed=3),
                        reg_items=reg.items)
    assert data.sampler.samples_per_epoch == 6 + sum(expected)  # twice as long
    n_train = len(train.items)
    for epoch in range(3):
        batches = data.sampler.batches(epoch)
        drawn = Counter(i for b in batches for i in b.items)
        assert [drawn[n_train + k] for k in range(len(expected))] == expected
        assert [drawn[k] for k in range(n_train)] == [2, 2, 2]
        assert set(drawn) == set(range(n_train + len(expected)))  # unused ones never appear
        assert any(len({data.is_reg[i] for i in b.items}) == 2 for b in batches)  # mixed
    assert [data.items[n_train + k].rel_path for k in range(2)] == [
        f"{reg_folder}/0.png", f"{reg_folder}/1.png"]
    # Captions: the same processing, except the trigger word (the class stays the class).
    options = DataOptions(buckets=BUCKETS, batch_size=2, captions=CaptionOptions(prefix="sks"))
    tb = TrainingData(train.items, options, reg_items=reg.items).load(
        Batch(0, 0, (64, 64), (0, n_train), (False, False)))
    assert tb.captions == ["sks, sks person", "person"] and tb.is_reg == (False, True)


def demo_config(model_dir, data, reg, out, **overrides):
    return config_for(model_dir, data, out, **{"dataset.reg_path": str(reg), **overrides})


@pytest.fixture
def folders(tmp_path):
    data = _folder(tmp_path / "data", "2_sks shape", 3, 0, "sks shape")
    reg = _folder(tmp_path / "reg", "1_shape", 2, 40, "a shape")
    return data, reg


def test_reg_folder_is_checked_like_the_training_set(demo_model_dir, folders, tmp_path, capsys):
    from trainer import train_setup as setup

    data, reg = folders
    (reg / "1_shape" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\ncut short")
    report = setup.check_dataset_or_refuse(demo_config(demo_model_dir, data, reg, tmp_path))
    assert [p.path for p in report.reg.skipped] == ["1_shape/broken.png"]
    assert "dataset.reg_path: 1 file skipped" in capsys.readouterr().err
    with pytest.raises(UserError, match="dataset.strict"):
        setup.check_dataset_or_refuse(demo_config(demo_model_dir, data, reg, tmp_path,
                                                  **{"dataset.strict": True}))
    only_broken = tmp_path / "only-broken"
    only_broken.mkdir()
    (only_broken / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\ncut short")
    for bad in (only_broken, tmp_path / "missing"):
        with pytest.raises(UserError) as refused:
            setup.check_dataset_or_refuse(demo_config(demo_model_dir, data, bad, tmp_path))
        assert str(refused.value).startswith(f'dataset.reg_path = "{bad}" cannot be used')
    with pytest.raises(UserError, match='does not apply to task = "lcm_distill"'):
        setup.check_dataset_or_refuse(demo_config(demo_model_dir, data, reg, tmp_path,
                                                  task="lcm_distill"))


def test_prior_loss_weight_scales_the_reg_samples_loss(demo_model_dir, folders, tmp_path,
                                                      one_torch_thread):
    from trainer import train_setup as setup
    from trainer.step_loss import StepContext, step_generator, training_loss

    data_dir, reg_dir = folders
    config = demo_config(demo_model_dir, data_dir, reg_dir, tmp_path,
                         **{"train.prior_loss_weight": 0.25})
    report = setup.check_dataset_or_refuse(config)
    sd = setup.load_model(config, torch.device("cpu"))
    network = setup.build_network(config, sd)
    data = TrainingData(report.items, setup.data_options(config, 2), reg_items=report.reg.items)
    tb = data.load(Batch(0, 0, (64, 64), (0, len(report.items)), (False, False)))
    assert tb.is_reg == (False, True)
    ctx = StepContext(torch.device("cpu"), "no")

    def loss(batch, mine, cfg=config):
        with torch.no_grad():
            return float(training_loss(cfg, sd, network, batch, mine, step_generator(7, 0, 0),
                                       False, ctx))
    try:
        l_train = loss(tb, slice(0, 1))
        l_reg = loss(tb, slice(1, 2), demo_config(demo_model_dir, data_dir, reg_dir, tmp_path))
        both = loss(tb, slice(0, 2))
    finally:
        network.detach()
    assert l_train > 0 and l_reg > 0
    assert both == pytest.approx(l_train + 0.25 * l_reg, rel=1e-5)
    assert both != pytest.approx(l_train + l_reg, rel=1e-3)


def test_reg_latents_are_cached_in_memory_and_on_disk(demo_model_dir, folders, tmp_path,
                                                      monkeypatch, one_torch_thread):
    from trainer import train_setup as setup

    monkeypatch.setenv("LORA_TRAINER_CACHE", str(tmp_path / "cache"))
    data_dir, reg_dir = folders
    for mode in ("memory", "disk"):
        config = demo_config(demo_model_dir, data_dir, reg_dir, tmp_path,
                             **{"dataset.cache_latents": mode})
        report = setup.check_dataset_or_refuse(config)
        sd = setup.load_model(config, torch.device("cpu"))
        data = setup.build_training_data(config, report.items, sd, 2, True, lambda: None,
                                         setup.reg_items(report))
        assert data.latent_cache.stats.encoded == 5  # 3 training + 2 reg images, once each
        again = data.cache_latents()
        assert (again.encoded, again.reused) == (0, 5)
        tb = data.load(Batch(0, 0, (64, 64), (3, 4), (False, False)))
        assert tb.latents.shape == (2, 4, 8, 8) and tb.is_reg == (True, True)
    files = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert len(files) >= 5
    fresh = setup.build_training_data(config, report.items, sd, 2, True, lambda: None,
                                      setup.reg_items(report))
    assert (fresh.latent_cache.stats.encoded, fresh.latent_cache.stats.reused) == (0, 5)


def test_a_resumed_run_with_reg_images_equals_the_uninterrupted_one(
        demo_model_dir, folders, tmp_path, one_torch_thread):
    from safetensors import safe_open

    from trainer.train import run

    _, reg_dir = folders
    data_dir = _folder(tmp_path / "once", "1_sks shape", 3, 0, "sks shape")
    settings = {"train.steps": 0, "train.epochs": 2, "train.save_state_every_n_steps": 2,
                "train.prior_loss_weight": 0.5}
    whole = run(demo_config(demo_model_dir, data_dir, reg_dir, tmp_path / "whole", **settings))
    # 3 training + 3 reg samples (repeats 2 and 1) per epoch at batch 2: 3 steps an epoch.
    assert whole.steps_done == 6 and len(whole.losses) == 6
    config = demo_config(demo_model_dir, data_dir, reg_dir, tmp_path / "parts", **settings)
    first = run(config, stop_at_step=4)  # resumed inside the second epoch
    second = run(config, resume=True)
    assert first.stopped_early and [m["step"] for m in metrics(tmp_path / "parts")] == list(
        range(1, 7))
    assert first.losses + second.losses == whole.losses
    with safe_open(str(whole.final_file), "pt") as file:
        meta = file.metadata()
    assert meta["ss_num_reg_images"] == "2" and meta["ss_prior_loss_weight"] == "0.5"
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"1_shape": {"n_repeats": 1,
                                                                   "img_count": 2}}


def test_the_dataset_tab_reports_the_reg_folder_next_to_the_training_set(folders):
    from gui import datasets

    data_dir, reg_dir = folders
    (reg_dir / "1_shape" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\ncut short")
    settings = [64, False, 256, 1024, 64, False]  # resolution, buckets, min, max, step, no_upscale
    train = datasets.check(str(data_dir), *settings, ".txt")
    assert train.report["samples_per_epoch"] == 6
    shown = datasets.reg_check(reg_dir, train.report, settings, ".txt")
    title, verdict = shown.split("\n\n")[:2]
    assert title == f"## Regularization images (dataset.reg_path = {reg_dir})"
    assert verdict.startswith("### Trainable: 2 images, 2 samples per epoch (with repeats), "
                              "1 file skipped")
    assert "| 1\\_shape/broken.png |" in shown or "| 1_shape/broken.png |" in shown
    assert shown.endswith("**Per epoch:** regularization: 6 reg samples per epoch from 2 "
                          "images, with 6 training samples; an epoch is 12 samples.")
    strict = datasets.reg_check(reg_dir, train.report, settings, ".txt", strict=True)
    assert "Not trainable with dataset.strict = true" in strict and "Per epoch" not in strict


def test_reg_path_resolves_against_the_toml_folder(tmp_path):
    from trainer.config import load_config

    toml = tmp_path / "run.toml"
    toml.write_text('[dataset]\npath = "data"\nreg_path = "reg"\n', encoding="utf-8")
    config = load_config(toml)
    assert Path(config.dataset.reg_path) == tmp_path / "reg"
    assert config.train.prior_loss_weight == 1.0
    with pytest.raises(UserError, match="prior_loss_weight"):
        load_config(toml, ["train.prior_loss_weight=-1"])
