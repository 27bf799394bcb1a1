"""diffusers -> original LDM ("A1111 single file") state-dict keys for SD 1.x.

The mapping follows diffusers' `scripts/convert_diffusers_to_original_stable_diffusion.py`
(unet_conversion_map*, vae_conversion_map*) and the LDM module layout of
CompVis/stable-diffusion `ldm/modules/diffusionmodules/openaimodel.py`
(input_blocks / middle_block / output_blocks) and `.../model.py` (VAE).

It is deliberately written independently of diffusers'
`single_file_utils.convert_ldm_*` (the reverse direction used by our loader),
so a round trip checks one against the other.
"""

from __future__ import annotations

import re

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer.text_model."

_UNET_TOP = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
_UNET_RESNET = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "time_emb_proj.": "emb_layers.1.",
    "conv_shortcut.": "skip_connection.",
}


def _unet_key(key: str, layers_per_block: int, up_has_attention: set[int]) -> str:
    for old, new in _UNET_TOP.items():
        if key.startswith(old):
            return new + key[len(old) :]
    # LDM numbers all sub-blocks of the encoder / decoder in one flat list:
    # each diffusers down block holds `layers_per_block` (resnet[, attention])
    # pairs plus a downsampler slot; each up block one more pair and the upsampler.
    step = layers_per_block + 1
    if match := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        block, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
        index = step * block + layer + 1
        return _resnet_or_attention(f"input_blocks.{index}", kind, rest)
    if match := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{step * (int(match[1]) + 1)}.0.op.{match[2]}"
    if match := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key):
        kind, layer, rest = match[1], int(match[2]), match[3]
        index = 1 if kind == "attentions" else 2 * layer
        return _resnet_or_attention(f"middle_block.{index}", kind, rest, sub=False)
    if match := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        block, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
        return _resnet_or_attention(f"output_blocks.{step * block + layer}", kind, rest)
    if match := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        block = int(match[1])
        # The upsampler sits after the attention when the block has one.
        slot = 2 if block in up_has_attention else 1
        return f"output_blocks.{step * block + layers_per_block}.{slot}.conv.{match[2]}"
    raise ValueError(f"no LDM name for U-Net key {key!r}")


def _resnet_or_attention(prefix: str, kind: str, rest: str, sub: bool = True) -> str:
    if kind == "attentions":
        # Transformer2DModel keeps its inner names (norm, proj_in, transformer_blocks...).
        return f"{prefix}.1.{rest}" if sub else f"{prefix}.{rest}"
    for old, new in _UNET_RESNET.items():
        if rest.startswith(old):
            rest = new + rest[len(old) :]
            break
    return f"{prefix}.0.{rest}" if sub else f"{prefix}.{rest}"


def unet_to_ldm(state_dict: dict, layers_per_block: int = 2) -> dict:
    """diffusers `UNet2DConditionModel` state dict -> `model.diffusion_model.*`."""
    up_has_attention = {
        int(m[1]) for k in state_dict if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))
    }
    return {
        UNET_PREFIX + _unet_key(k, layers_per_block, up_has_attention): v
        for k, v in state_dict.items()
    }


_VAE_ATTENTION = {
    "group_norm.": "norm.",
    "to_q.": "q.",
    "to_k.": "k.",
    "to_v.": "v.",
    "to_out.0.": "proj_out.",
}


def _vae_key(key: str, num_blocks: int) -> str:
    key = key.replace("conv_norm_out.", "norm_out.").replace("conv_shortcut.", "nin_shortcut.")
    if match := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"encoder.down.{match[1]}.block.{match[2]}.{match[3]}"
    if match := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)", key):
        return f"encoder.down.{match[1]}.downsample.{match[2]}"
    # The LDM decoder counts its levels from the lowest resolution up, in
    # reverse of diffusers' up_blocks order.
    if match := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"decoder.up.{num_blocks - 1 - int(match[1])}.block.{match[2]}.{match[3]}"
    if match := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
        return f"decoder.up.{num_blocks - 1 - int(match[1])}.upsample.{match[2]}"
    if match := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"{match[1]}.mid.block_{int(match[2]) + 1}.{match[3]}"
    if match := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key):
        rest = match[2]
        for old, new in _VAE_ATTENTION.items():
            if rest.startswith(old):
                return f"{match[1]}.mid.attn_1.{new}{rest[len(old) :]}"
    if re.match(r"(encoder|decoder)\.(conv_in|conv_out|norm_out)\.", key) or re.match(
        r"(post_)?quant_conv\.", key
    ):
        return key
    raise ValueError(f"no LDM name for VAE key {key!r}")


def vae_to_ldm(state_dict: dict) -> dict:
    """diffusers `AutoencoderKL` state dict -> `first_stage_model.*`.

    LDM's VAE attention uses 1x1 convolutions where diffusers uses Linear
    layers, so those weights gain two trailing unit dimensions.
    """
    num_blocks = 1 + max(
        int(m[1]) for k in state_dict if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k))
    )
    converted = {}
    for key, value in state_dict.items():
        new_key = _vae_key(key, num_blocks)
        if ".mid.attn_1." in new_key and new_key.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]
        converted[VAE_PREFIX + new_key] = value
    return converted


def text_encoder_to_ldm(state_dict: dict) -> dict:
    """transformers `CLIPTextModel` state dict -> `cond_stage_model.transformer.text_model.*`.

    Accepts both the transformers < 5.6 layout (`text_model.` prefix) and
    the flattened one; `position_ids` is written like the original SD1.x
    checkpoints have it.
    """
    import torch

    converted = {TEXT_PREFIX + k.removeprefix("text_model."): v for k, v in state_dict.items()}
    position_ids = TEXT_PREFIX + "embeddings.position_ids"
    if position_ids not in converted:
        # A non-persistent buffer in transformers 5, but present (int64,
        # shape (1, 77)) in the published SD1.x checkpoints; loaders must cope.
        positions = converted[TEXT_PREFIX + "embeddings.position_embedding.weight"].shape[0]
        converted[position_ids] = torch.arange(positions, dtype=torch.int64)[None]
    return converted
