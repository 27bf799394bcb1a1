"""A tiny, deterministic SD1.5-shaped model for tests and demos.

Same module names and kinds as Stable Diffusion v1.5 (16 Transformer2DModel
blocks with 1x1-conv proj_in/proj_out, ResnetBlock2D with conv_shortcut
exactly where SD1.5 changes width, 12 CLIP text layers), so LoRA target
selection (docs/FORMATS.md "Targeted modules") sees the SD1.5 set of 264 modules,
but with widths small enough to build and run in seconds on a CPU.

Every config value that cannot be read back from tensor shapes (attention
heads, norm groups, activations, scheduler) is left at its SD1.5 value, so
the single-file copy loads through the same path as a real SD1.5 file and
computes exactly what the diffusers copy computes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from core.errors import UserError
from trainer.sd15_config import load_sd15_config
from trainer.tokenizer import load_offline_tokenizer, write_tokenizer_files

DIFFUSERS_SUBDIR = "diffusers"
SINGLE_FILE_NAME = "demo-sd15.safetensors"

# SD1.5's (320, 640, 1280, 1280) divided by 10: the width changes at the same
# blocks, so conv_shortcut modules appear where SD1.5 has them. 32 is the
# smallest width the SD1.5 GroupNorm(32, C) allows.
DEMO_UNET = {"block_out_channels": [32, 64, 128, 128], "cross_attention_dim": 32}
# The VAE is not a LoRA target, so only its 4 levels (factor 8) and 4 latent
# channels matter; one resnet per level keeps it small.
DEMO_VAE = {"block_out_channels": [32, 32, 64, 64], "layers_per_block": 1}
# One 32-wide head per layer follows the loader's rule (head size 64, at
# least one head), which is all a single-file checkpoint can tell.
DEMO_TEXT = {
    "hidden_size": 32,
    "intermediate_size": 128,
    "num_attention_heads": 1,
    "projection_dim": 32,
}


def build_demo_components(seed: int = 0) -> dict:
    """Pipeline components with seeded random weights."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config({**load_sd15_config("unet"), **DEMO_UNET})
        vae = AutoencoderKL.from_config({**load_sd15_config("vae"), **DEMO_VAE})
        text_config = CLIPTextConfig(**{**load_sd15_config("text_encoder"), **DEMO_TEXT})
        text_encoder = CLIPTextModel(text_config)
    finally:
        # Callers (tests) should not see their global RNG moved.
        torch.random.set_rng_state(generator_state)
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": load_offline_tokenizer(),
        "scheduler": PNDMScheduler.from_config(load_sd15_config("scheduler")),
    }


def single_file_state_dict(components: dict) -> dict:
    """The components as one original-layout (A1111/LDM) state dict."""
    from trainer.ldm_keys import text_encoder_to_ldm, unet_to_ldm, vae_to_ldm

    unet = components["unet"]
    state = unet_to_ldm(unet.state_dict(), unet.config.layers_per_block)
    state.update(vae_to_ldm(components["vae"].state_dict()))
    state.update(text_encoder_to_ldm(components["text_encoder"].state_dict()))
    # safetensors refuses tensors that share memory; cloning is cheap here.
    return {key: value.detach().clone().contiguous() for key, value in state.items()}


def make_demo_model(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write `out_dir/diffusers/` and `out_dir/demo-sd15.safetensors`.

    Returns the two paths. Same seed, same bytes.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} is a file; make-demo-model expects a folder to write into.")
    target = out_dir / DIFFUSERS_SUBDIR
    if target.exists() and not (target / "model_index.json").is_file():
        raise UserError(
            f"{target} already exists and is not a diffusers model folder; "
            "choose another output folder."
        )
    out_dir.mkdir(parents=True, exist_ok=True)

    # Imported after the argument checks so that mistakes are reported fast.
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    components = build_demo_components(seed)
    pipe = StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    # Build next to the target and swap in, so an interrupted run never
    # leaves a half-written model where a complete one is expected.
    staging = Path(tempfile.mkdtemp(prefix=".diffusers-", dir=out_dir))
    staging.chmod(0o755)  # mkdtemp makes it private; the model is not secret.
    try:
        pipe.save_pretrained(staging, safe_serialization=True)
        # transformers 5 saves only tokenizer.json; the classic vocab.json +
        # merges.txt pair keeps the folder readable by older tools too.
        write_tokenizer_files(staging / "tokenizer")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    single_file = out_dir / SINGLE_FILE_NAME
    partial = single_file.with_name(f".{SINGLE_FILE_NAME}.partial")
    save_file(single_file_state_dict(components), str(partial), metadata={"format": "pt"})
    os.replace(partial, single_file)
    return {"diffusers": target, "single_file": single_file}
