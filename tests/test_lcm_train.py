"""LCM-LoRA distillation through the training CLI path, and 4-step previews."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors
import torch

from tests.test_train import config_for, metrics
from trainer.model_loading import build_pipeline
from trainer.preview import preview_settings
from trainer.train import run

REPO = Path(__file__).resolve().parents[1]
DISTILL = {
    "task": "lcm_distill", "network.type": "locon", "network.rank": 8, "network.alpha": 8,
    "network.conv_rank": 8, "network.conv_alpha": 8, "train.unet_lr": 1e-3, "train.steps": 40,
    "train.batch_size": 2, "lcm.w_min": 3.0, "lcm.w_max": 6.0,
}  # fmt: skip


@pytest.fixture(scope="module")
def distilled(demo_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lcm")
    from trainer.demo_assets import write_demo_dataset

    write_demo_dataset(root / "data", size=64)
    out = root / "out"
    run(config_for(demo_model_dir, root / "data", out, **DISTILL))
    return out


def test_distillation_loss_falls_and_the_file_is_marked(distilled):
    losses = [m["loss"] for m in metrics(distilled)]
    assert len(losses) == 40
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)
    with safetensors.safe_open(str(distilled / "test.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_lcm_lora"] == "True" and "LCM" in meta["modelspec.usage_hint"]


def test_distilled_file_loads_in_diffusers_and_samples_in_4_steps(distilled, demo_sd, tmp_path):
    pipe = build_pipeline(copy.deepcopy(demo_sd))
    pipe.load_lora_weights(str(distilled / "test.safetensors"))  # raises if it cannot

    out = tmp_path / "lcm.png"
    result = subprocess.run(
        [sys.executable, "-m", "trainer", "sample", "--model", str(demo_sd.source),
         "--lcm-lora", str(distilled / "test.safetensors"), "--prompt", "a red circle",
         "--size", "64x64", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_with_an_lcm_lora_writes_4_step_previews(distilled, demo_model_dir, tmp_path):
    lcm_file = distilled / "test.safetensors"
    extra = {
        "train.steps": 4, "sample.prompts": ["a red circle"], "sample.every_n_steps": 2,
        "sample.lcm_lora": str(lcm_file), "sample.steps": 20,
    }  # fmt: skip
    config = config_for(demo_model_dir, distilled.parent / "data", tmp_path, **extra)
    settings = preview_settings(config)
    assert (settings.sampler, settings.steps, settings.guidance) == ("lcm", 4, 1.0)
    run(config)
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [
        "step000002-0.png", "step000004-0.png",
    ]  # fmt: skip
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 4


def test_ema_target_changes_later_steps_and_resumes_exactly(demo_model_dir, tmp_path):
    from safetensors.torch import load_file

    from core.errors import UserError
    from trainer.demo_assets import write_demo_dataset

    data = tmp_path / "data"
    write_demo_dataset(data, size=64)
    short = {**DISTILL, "train.steps": 6, "output.save_precision": "fp32"}
    ema = {**short, "lcm.target_ema": 0.9}
    run(config_for(demo_model_dir, data, tmp_path / "plain", **short))
    run(config_for(demo_model_dir, data, tmp_path / "ema", **ema))
    plain = [m["loss"] for m in metrics(tmp_path / "plain")]
    straight = [m["loss"] for m in metrics(tmp_path / "ema")]
    # The EMA starts as the student: the first step is the same, later ones are not.
    assert straight[0] == plain[0] and straight[1:] != plain[1:]

    split = tmp_path / "split"
    run(config_for(demo_model_dir, data, split, **ema), stop_at_step=3)
    state = sorted((split / "state").iterdir())[-1] / "adapter.safetensors"
    assert any(key.startswith("lcm_target_ema.") for key in load_file(state))
    run(config_for(demo_model_dir, data, split, **ema), resume=True)
    assert [m["loss"] for m in metrics(split)] == straight
    a, b = load_file(tmp_path / "ema" / "test.safetensors"), load_file(split / "test.safetensors")
    assert all(torch.equal(a[key], b[key]) for key in a)

    no_ema = tmp_path / "no-ema"
    run(config_for(demo_model_dir, data, no_ema, **short), stop_at_step=2)
    with pytest.raises(UserError, match="saved without an EMA target"):
        run(config_for(demo_model_dir, data, no_ema, **ema), resume=True)
