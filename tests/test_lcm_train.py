"""LCM-LoRA distillation through the training CLI path, and 4-step previews."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors

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
