"""Build diffusers/transformers models from an original-layout SD1.x state dict.

No hub access: configs start from the shipped SD1.5 ones
(`trainer/configs/sd15/`) and take every size that the tensor shapes reveal
from the checkpoint itself, so the same path loads a real SD1.5 file and the
tiny demo model. Key conversion for the U-Net and VAE is diffusers' own
(`diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint` /
`convert_ldm_vae_checkpoint`, which need no network when given a config);
the CLIP text encoder only needs its prefix changed.

What shapes cannot tell keeps its SD1.5 value: U-Net attention heads (8),
GroupNorm groups (32), activations, and the text encoder's head count,
derived from CLIP's 64-wide heads (ViT-L/14: 768 = 12 x 64).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from core.errors import UserError
from trainer.checkpoint_io import TEXT_ROOT_PREFIX
from trainer.ldm_keys import UNET_PREFIX, VAE_PREFIX
from trainer.sd15_config import load_sd15_config


def _indices(keys, pattern: str) -> list[int]:
    return sorted({int(m[1]) for k in keys if (m := re.match(pattern, k))})


def infer_unet_config(ldm: dict) -> dict:
    """UNet2DConditionModel config from `model.diffusion_model.*` tensors (prefix removed)."""
    config = load_sd15_config("unet")
    num_inputs = len(_indices(ldm, r"input_blocks\.(\d+)\."))
    num_blocks = len(_indices(ldm, r"input_blocks\.(\d+)\.0\.op\.weight")) + 1
    # input_blocks = conv_in + per level `layers` resnets + a downsampler
    # on every level but the last.
    layers, remainder = divmod(num_inputs - num_blocks, num_blocks)
    if remainder or layers < 1 or len(_indices(ldm, r"middle_block\.(\d+)\.")) != 3:
        raise KeyError("input_blocks / middle_block layout")
    step = layers + 1
    widths = [
        ldm[f"input_blocks.{1 + step * i}.0.out_layers.3.weight"].shape[0]
        for i in range(num_blocks)
    ]
    has_down_attn = [
        f"input_blocks.{1 + step * i}.1.proj_in.weight" in ldm for i in range(num_blocks)
    ]
    has_up_attn = [f"output_blocks.{step * i}.1.proj_in.weight" in ldm for i in range(num_blocks)]
    proj_in = ldm["middle_block.1.proj_in.weight"]
    config.update(
        in_channels=ldm["input_blocks.0.0.weight"].shape[1],
        out_channels=ldm["out.2.weight"].shape[0],
        layers_per_block=layers,
        block_out_channels=widths,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_down_attn],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in has_up_attn],
        cross_attention_dim=ldm["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1],
        # SD2 switched to Linear projections; SD1.x uses 1x1 convolutions.
        use_linear_projection=proj_in.ndim == 2,
    )
    return config


def infer_vae_config(ldm: dict) -> dict:
    """AutoencoderKL config from `first_stage_model.*` tensors (prefix removed)."""
    config = load_sd15_config("vae")
    levels = _indices(ldm, r"encoder\.down\.(\d+)\.")
    layers = len(_indices(ldm, r"encoder\.down\.0\.block\.(\d+)\."))
    config.update(
        in_channels=ldm["encoder.conv_in.weight"].shape[1],
        out_channels=ldm["decoder.conv_out.weight"].shape[0],
        latent_channels=ldm["decoder.conv_in.weight"].shape[1],
        layers_per_block=layers,
        block_out_channels=[ldm[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in levels],
        down_block_types=["DownEncoderBlock2D"] * len(levels),
        up_block_types=["UpDecoderBlock2D"] * len(levels),
    )
    return config


def text_state_dict(checkpoint: dict) -> dict:
    """`cond_stage_model.transformer[.text_model].*` -> flattened CLIPTextModel keys."""
    state = {}
    for key, value in checkpoint.items():
        if key.startswith(TEXT_ROOT_PREFIX):
            name = key[len(TEXT_ROOT_PREFIX) :].removeprefix("text_model.")
            # A buffer, not a weight (and broken in some merged checkpoints).
            if name != "embeddings.position_ids":
                state[name] = value
    return state


def infer_text_config(state: dict) -> dict:
    """CLIPTextConfig values from flattened CLIPTextModel tensors."""
    config = load_sd15_config("text_encoder")
    vocab, hidden = state["embeddings.token_embedding.weight"].shape
    config.update(
        vocab_size=vocab,
        hidden_size=hidden,
        projection_dim=hidden,
        max_position_embeddings=state["embeddings.position_embedding.weight"].shape[0],
        num_hidden_layers=len(_indices(state, r"encoder\.layers\.(\d+)\.")),
        intermediate_size=state["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_attention_heads=hidden // 64 if hidden % 64 == 0 else 1,
    )
    return config


def _strip(checkpoint: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in checkpoint.items() if k.startswith(prefix)}


def _materialize(model, state: dict, path: Path, part: str, dtype: torch.dtype):
    """Load `state` into a model built on the meta device, checking names and shapes."""
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        detail = "; ".join(
            f"{len(names)} {label}, e.g. {names[0]}"
            for label, names in (("missing", missing), ("unexpected", unexpected))
            if names
        )
        raise UserError(
            f"{path} has {part} weights that do not match the Stable Diffusion 1.x layout "
            f"({detail}); expected an unmodified SD1.x checkpoint."
        )
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    try:
        # assign=True adopts the loaded tensors instead of copying into
        # (non-existent) meta storage: one copy of the weights in memory.
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        raise UserError(
            f"{path} has {part} weights whose shapes do not match the Stable Diffusion 1.x "
            f"layout inferred from it ({error}); expected an unmodified SD1.x checkpoint."
        ) from error
    return model.eval()


def models_from_checkpoint(checkpoint: dict, path: Path, dtype: torch.dtype = torch.float32):
    """(unet, vae, text_encoder) from an original-layout SD1.x state dict."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    text_state = text_state_dict(checkpoint)
    try:
        unet_config = infer_unet_config(_strip(checkpoint, UNET_PREFIX))
        vae_config = infer_vae_config(_strip(checkpoint, VAE_PREFIX))
        text_config = infer_text_config(text_state)
    except (KeyError, ValueError, IndexError) as error:
        raise UserError(
            f"{path} does not have the Stable Diffusion 1.x module layout (no {error}); "
            "expected an unmodified SD1.x checkpoint."
        ) from error
    if unet_config["cross_attention_dim"] != text_config["hidden_size"]:
        raise UserError(
            f"{path} pairs a U-Net expecting {unet_config['cross_attention_dim']}-wide text "
            f"features with a {text_config['hidden_size']}-wide text encoder; expected an "
            "SD1.x checkpoint whose parts belong together."
        )

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(vae_config)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    # transformers >= 5.6 flattened CLIPTextModel; older ones nest it in `text_model`.
    if hasattr(text_encoder, "text_model"):
        text_state = {f"text_model.{k}": v for k, v in text_state.items()}

    unet_state = convert_ldm_unet_checkpoint(checkpoint, unet_config)
    vae_state = convert_ldm_vae_checkpoint(checkpoint, vae_config)
    return (
        _materialize(unet, unet_state, path, "U-Net", dtype),
        _materialize(vae, vae_state, path, "VAE", dtype),
        _materialize(text_encoder, text_state, path, "text encoder", dtype),
    )
