"""Kohya module names in the original LDM U-Net layout -> diffusers layout, SD 1.x.

ComfyUI and some converters write `lora_unet_input_blocks_1_1_proj_in`;
A1111, diffusers and this trainer read `lora_unet_down_blocks_0_attentions_0_proj_in`
(docs/FORMATS.md "Module names", "How other tools load a file"). The map is the
reverse of the one `trainer/ldm_keys.py` applies to checkpoint keys (a test holds
the two against each other over every layer of SD1.5); it is written again here
because networks/ may not import trainer/.

Names are kohya names, dots already turned into underscores, without the
`lora_unet_` prefix. LDM numbers the encoder's sub-blocks in one flat list:
each diffusers down block holds `layers_per_block` (resnet, attention) pairs
and then a downsampler slot; each up block one pair more, the upsampler
sitting in the last pair's slot after the attention (or the resnet).
"""

from __future__ import annotations

import re

SD1_LAYERS_PER_BLOCK = 2
# The roots of LDM-layout names; a name with one of them that does not parse
# is a name we cannot map (refused), never passed through.
LDM_ROOTS = ("input_blocks_", "middle_block_", "output_blocks_", "time_embed_", "out_")

_TOP = {
    "time_embed_0": "time_embedding_linear_1",
    "time_embed_2": "time_embedding_linear_2",
    "input_blocks_0_0": "conv_in",
    "out_0": "conv_norm_out",
    "out_2": "conv_out",
}
_RESNET = {
    "in_layers_0": "norm1",
    "in_layers_2": "conv1",
    "out_layers_0": "norm2",
    "out_layers_3": "conv2",
    "emb_layers_1": "time_emb_proj",
    "skip_connection": "conv_shortcut",
}
# A Transformer2DModel (LDM's SpatialTransformer) keeps its inner names.
_ATTENTION_CHILD = re.compile(
    r"(norm|proj_in|proj_out"
    r"|transformer_blocks_\d+_(norm[123]|attn[12]_(to_q|to_k|to_v|to_out_0)|ff_net_0_proj|ff_net_2))"
)
_INPUT = re.compile(r"input_blocks_(\d+)_(\d+)_(.+)")
_MIDDLE = re.compile(r"middle_block_(\d+)_(.+)")
_OUTPUT = re.compile(r"output_blocks_(\d+)_(\d+)_(.+)")


def is_ldm_name(name: str) -> bool:
    """Whether a U-Net module name (after `lora_unet_`) is in the LDM layout."""
    return name.startswith(LDM_ROOTS)


def ldm_to_diffusers(name: str, layers_per_block: int = SD1_LAYERS_PER_BLOCK) -> str | None:
    """The diffusers-layout name of an LDM-layout U-Net module name, or None
    when it names no layer of an SD 1.x U-Net."""
    if name in _TOP:
        return _TOP[name]
    step = layers_per_block + 1
    if match := _INPUT.fullmatch(name):
        index, slot, rest = int(match[1]), int(match[2]), match[3]
        if index == 0:
            return None
        block, layer = divmod(index - 1, step)
        if layer == layers_per_block:
            return f"down_blocks_{block}_downsamplers_0_conv" if (slot, rest) == (0, "op") else None
        return _pair(f"down_blocks_{block}", layer, slot, rest)
    if match := _MIDDLE.fullmatch(name):
        index, rest = int(match[1]), match[2]
        if index == 1:
            return _pair("mid_block", 0, 1, rest)
        return _pair("mid_block", index // 2, 0, rest) if index in (0, 2) else None
    if match := _OUTPUT.fullmatch(name):
        index, slot, rest = int(match[1]), int(match[2]), match[3]
        block, layer = divmod(index, step)
        if rest == "conv" and slot in (1, 2):
            # Only the last pair of an up block holds the upsampler.
            return f"up_blocks_{block}_upsamplers_0_conv" if layer == layers_per_block else None
        return _pair(f"up_blocks_{block}", layer, slot, rest)
    return None


def _pair(block: str, layer: int, slot: int, rest: str) -> str | None:
    """Slot 0 of a pair is the resnet, slot 1 the attention."""
    if slot == 0 and rest in _RESNET:
        return f"{block}_resnets_{layer}_{_RESNET[rest]}"
    if slot == 1 and _ATTENTION_CHILD.fullmatch(rest):
        return f"{block}_attentions_{layer}_{rest}"
    return None
