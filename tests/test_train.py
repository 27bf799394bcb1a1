"""Training on the demo model: it learns, resumes exactly, stops cleanly,
refuses bad setups early, and splits across processes without changing the result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.errors import UserError
from tests.train_helpers import fixed_eval_loss, with_adapter
from trainer.config import load_config
from trainer.train import run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def four_images(tmp_path_factory):
    """Four captioned images: small enough to overfit in a few dozen steps."""
    from trainer.demo_assets import write_demo_dataset

    root = tmp_path_factory.mktemp("data") / "all"
    write_demo_dataset(root, size=64)
    images = sorted((root / "4_demoshape").glob("*.png"))
    keep = images[:4]
    for image in images[4:]:
        image.unlink()
        image.with_suffix(".txt").unlink()
    assert len(keep) == 4
    return root


def config_for(model_dir, dataset, out, **overrides):
    values = {
        "model.path": str(model_dir / "diffusers"),
        "dataset.path": str(dataset),
        "dataset.resolution": 64,
        "dataset.buckets": False,
        "dataset.cache_latents": "memory",
        "network.rank": 4,
        "network.alpha": 4,
        "network.train_text_encoder": False,
        "train.steps": 20,
        "train.batch_size": 2,
        "train.unet_lr": 1e-3,
        "train.scheduler": "constant",
        "train.seed": 7,
        "output.dir": str(out),
        "output.name": "test",
        "output.save_precision": "fp32",
    }
    values.update(overrides)
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in values.items()])


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_overfitting_four_images_lowers_the_loss_and_the_file_changes_outputs(
    demo_model_dir, demo_sd, four_images, tmp_path
):
    config = config_for(demo_model_dir, four_images, tmp_path, **{
        "train.steps": 60, "train.unet_lr": 3e-3, "network.type": "locon",
        "network.conv_rank": 4, "network.conv_alpha": 4,
    })  # fmt: skip
    result = run(config)
    assert result.final_file.exists() and not result.stopped_early
    before = fixed_eval_loss(demo_sd, four_images)
    with with_adapter(demo_sd, result.final_file) as adapted:
        after = fixed_eval_loss(adapted, four_images)
    # Measured: 1.17 -> 0.48 on the demo model.
    assert after < 0.6 * before, (before, after)
    logged = [m["loss"] for m in metrics(tmp_path)]
    assert len(logged) == 60 and all(m["it_s"] > 0 for m in metrics(tmp_path))
    assert (tmp_path / "config.toml").exists()
    assert any((tmp_path / "tensorboard").iterdir())


def test_resume_gives_the_same_losses_and_weights(demo_model_dir, four_images, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(config_for(demo_model_dir, four_images, straight))
    first = run(config_for(demo_model_dir, four_images, split), stop_at_step=10)
    assert first.stopped_early and first.steps_done == 10 and first.final_file is None
    run(config_for(demo_model_dir, four_images, split), resume=True)

    assert [m["loss"] for m in metrics(split)] == [m["loss"] for m in metrics(straight)]
    a, b = load_file(straight / "test.safetensors"), load_file(split / "test.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_crash_while_saving_keeps_the_previous_state(tmp_path, monkeypatch):
    from trainer.state import Progress, load_latest_state, save_state

    params = torch.nn.Linear(3, 3)
    optimizer = torch.optim.AdamW(params.parameters())
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer)
    save_state(tmp_path, Progress(5, 0, 5), {"w": torch.ones(2)}, optimizer, scheduler)

    def crash(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("trainer.state.os.fsync", crash)
    with pytest.raises(UserError, match="previous state is untouched"):
        save_state(tmp_path, Progress(9, 0, 9), {"w": torch.zeros(2)}, optimizer, scheduler)
    loaded = load_latest_state(tmp_path)
    assert loaded.progress.step == 5 and torch.equal(loaded.adapter["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["state-00000005"]


def test_bf16_stores_the_frozen_weights_in_bf16_and_keeps_the_vae_fp32(
    demo_model_dir, four_images, tmp_path
):
    from trainer.train_setup import load_model

    config = config_for(demo_model_dir, four_images, tmp_path, **{"train.mixed_precision": "bf16"})
    sd = load_model(config, torch.device("cpu"))
    assert {p.dtype for p in sd.unet.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in sd.text_encoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in sd.vae.parameters()} == {torch.float32}


def cli(*args, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "trainer", *map(str, args)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs,
    )  # fmt: skip


def overrides(model_dir, dataset, out, **extra) -> list[str]:
    values = {
        "model.path": str(model_dir / "diffusers"), "dataset.path": str(dataset),
        "dataset.resolution": 64, "dataset.buckets": False,
        "network.rank": 4, "network.train_text_encoder": False,
        "train.batch_size": 2, "train.seed": 7, "train.scheduler": "constant",
        "output.dir": str(out), "output.name": "test", "output.save_precision": "fp32",
        **extra,
    }  # fmt: skip
    return [arg for k, v in values.items() for arg in ("--set", f"{k}={json.dumps(v)}")]


def test_sigterm_stops_cleanly_and_the_run_resumes(demo_model_dir, four_images, tmp_path):
    args = overrides(demo_model_dir, four_images, tmp_path, **{"train.steps": 400})
    process = cli("train", REPO / "presets" / "sd15-character-lora.toml", *args)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if (tmp_path / "metrics.jsonl").exists() and len(metrics(tmp_path)) >= 3:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert "continue with --resume" in stdout
    states = sorted((tmp_path / "state").iterdir())
    assert states and states[-1].name.startswith("state-")
    done = len(metrics(tmp_path))
    assert 3 <= done < 400

    resumed = cli("train", REPO / "presets" / "sd15-character-lora.toml", *args, "--resume",
                  "--stop-at-step", str(done + 2))  # fmt: skip
    stdout, stderr = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, stderr
    assert [m["step"] for m in metrics(tmp_path)] == list(range(1, done + 3))


def test_two_processes_match_one_with_the_same_global_batch(demo_model_dir, four_images, tmp_path):
    # Plain SGD: the weights then follow the summed gradients linearly. Adam's
    # first steps are sign(g) * lr, which turns float-order noise on
    # near-zero gradients into whole lr-sized steps and would hide real errors.
    sgd = {"train.optimizer": "sgd", "train.unet_lr": 0.05, "train.weight_decay": 0.0}
    one, two = tmp_path / "one", tmp_path / "two"
    one_args = overrides(demo_model_dir, four_images, one, **{"train.steps": 6}, **sgd)
    single = cli("train", REPO / "presets" / "sd15-character-lora.toml", *one_args)
    assert single.wait(timeout=300) == 0, single.stderr.read()
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    double = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "-m", "trainer", "train",
         str(REPO / "presets" / "sd15-character-lora.toml"),
         *overrides(demo_model_dir, four_images, two,
                    **{"train.steps": 6, "train.batch_size": 1}, **sgd)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert double.returncode == 0, double.stderr[-3000:]
    a, b = load_file(one / "test.safetensors"), load_file(two / "test.safetensors")
    # Same global batch, same noise: only the order of float sums differs.
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)
    assert [m["step"] for m in metrics(two)] == list(range(1, 7))


def test_unwritable_output_and_broken_dataset_stop_before_loading(demo_model_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match="not writable.*output.dir"):
        run(config_for(demo_model_dir, broken, blocker / "out"))
    with pytest.raises(UserError, match="a.png"):
        run(config_for(Path("/nonexistent-model"), broken, tmp_path / "out"))


def test_diverging_loss_stops_with_a_clear_message(demo_model_dir, four_images, tmp_path):
    config = config_for(demo_model_dir, four_images, tmp_path,
                        **{"train.unet_lr": 1e30, "train.max_grad_norm": 0})  # fmt: skip
    with pytest.raises(UserError, match="training diverged"):
        run(config)


def test_cpu_demo_preset_runs_end_to_end(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "LORA_TRAINER_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, "-m", "trainer", "train", str(REPO / "presets" / "cpu-demo.toml"),
         "--set", f"output.dir={tmp_path / 'out'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    assert (out / "cpu-demo.safetensors").stat().st_size > 0
    assert sorted(p.name for p in (out / "samples").iterdir()) == [
        "step000015-0.png", "step000030-0.png",
    ]  # fmt: skip
    assert len(metrics(out)) == 30
    assert "done: 30 steps" in result.stdout


@pytest.mark.parametrize(
    "extra",
    [
        {"train.gradient_checkpointing": True, "network.train_text_encoder": True},
        {"train.mixed_precision": "bf16", "network.type": "loha"},
        {"train.min_snr_gamma": 5.0, "train.noise_offset": 0.05, "model.clip_skip": 2,
         "train.grad_accum": 2, "model.v_parameterization": True},
    ],
    ids=["checkpointing+te", "bf16+loha", "snr+offset+clipskip+accum"],
)  # fmt: skip
def test_training_options_run_and_keep_fp32_adapters(extra, demo_model_dir, four_images, tmp_path):
    if extra.get("model.v_parameterization"):  # single files take it from the config
        extra = {**extra, "model.path": str(demo_model_dir / "demo-sd15.safetensors")}
    result = run(config_for(demo_model_dir, four_images, tmp_path, **{"train.steps": 3, **extra}))
    assert len(result.losses) == 3 and all(0 < loss < 10 for loss in result.losses)
    state = sorted((tmp_path / "state").iterdir())[-1]
    assert {t.dtype for t in load_file(state / "adapter.safetensors").values()} == {torch.float32}
