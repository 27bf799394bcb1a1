"""Previews decoded with TAESD (diffusers AutoencoderTiny) instead of the VAE."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from core.errors import UserError
from tests.test_train import config_for
from trainer.config import load_config
from trainer.model_loading import build_pipeline
from trainer.preview_decoder import load_preview_decoder
from trainer.sampling import SampleSettings, generate, make_scheduler
from trainer.text_encoding import encode_captions
from trainer.train import run


@pytest.fixture(scope="module")
def taesd_dir(tmp_path_factory):
    """The TAESD architecture with random weights (the real ones are a download)."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("taesd")
    AutoencoderTiny().save_pretrained(folder)
    return folder


SETTINGS = SampleSettings(prompts=("a red circle",), steps=2, sampler="ddim", guidance=1.0,
                          width=64, height=64, seed=7)  # fmt: skip


def test_preview_is_the_taesd_decode_of_the_same_latents(demo_sd, taesd_dir):
    image = np.asarray(generate(demo_sd, replace(SETTINGS, decoder=str(taesd_dir)))[0])
    with_vae = np.asarray(generate(demo_sd, SETTINGS)[0])

    pipe = build_pipeline(demo_sd, make_scheduler("ddim", demo_sd.scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    embeds = encode_captions(demo_sd.text_encoder, demo_sd.tokenizer, ["a red circle"])
    with torch.no_grad():
        latents = pipe(prompt_embeds=embeds, negative_prompt_embeds=embeds,
                       num_inference_steps=2, guidance_scale=1.0, width=64, height=64,
                       generator=torch.Generator().manual_seed(7), output_type="latent").images
        decoded = load_preview_decoder(str(taesd_dir)).decode(latents).sample
    expected = ((decoded[0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().numpy()

    assert image.shape == with_vae.shape == (64, 64, 3)
    assert np.abs(image.astype(float) - expected).max() <= 1
    assert np.abs(image.astype(float) - with_vae.astype(float)).mean() > 1


def test_unusable_decoder_folders_are_refused_with_the_setting_named(demo_model_dir, tmp_path):
    with pytest.raises(UserError, match=r"sample.preview_decoder = .*missing is not a folder"):
        load_preview_decoder(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="has no config.json.*madebyollin/taesd"):
        load_preview_decoder(str(tmp_path))
    vae = demo_model_dir / "diffusers" / "vae"
    with pytest.raises(UserError, match="holds a AutoencoderKL, not an AutoencoderTiny"):
        load_preview_decoder(str(vae), "--preview-decoder")


def test_config_refuses_a_missing_decoder_folder_before_training(demo_model_dir, tmp_path):
    settings = [f"model.path={demo_model_dir / 'diffusers'}", f"dataset.path={tmp_path}",
                f"sample.preview_decoder={tmp_path / 'nope'}"]  # fmt: skip
    from trainer.config import require_paths

    with pytest.raises(UserError, match="sample.preview_decoder = .*nope.* is not a folder"):
        require_paths(load_config(None, [s.replace("=", '="', 1) + '"' for s in settings]))


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("decoder", ["vae", "taesd"])
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_training_previews_decode_in_every_precision(
    demo_model_dir, taesd_dir, tmp_path, decoder, precision
):
    """bf16 training makes bf16 latents; the decoders stay fp32 (a crash before)."""
    from trainer.demo_assets import write_demo_dataset

    write_demo_dataset(tmp_path / "data", size=64)
    extra = {"train.steps": 2, "sample.prompts": ["a red circle"], "sample.every_n_steps": 2,
             "sample.steps": 2, "train.mixed_precision": precision,
             "sample.preview_decoder": str(taesd_dir) if decoder == "taesd" else ""}  # fmt: skip
    run(config_for(demo_model_dir, tmp_path / "data", tmp_path / "out", **extra))
    samples = list((tmp_path / "out" / "samples").iterdir())
    assert [p.name for p in samples] == ["step000002-0.png"]
    assert np.asarray(Image.open(samples[0])).std() > 0
