"""Which layers get an adapter, and their kohya names (as kohya sd-scripts).

Targets are found by the kind of block that contains them (a table of block
classes), never by matching class-name strings.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.upsampling import Upsample2D
from torch import nn
from transformers.models.clip.modeling_clip import CLIPMLP, CLIPAttention

UNET_PREFIX = "lora_unet"
TEXT_ENCODER_PREFIX = "lora_te"

# Child layers adapted inside each block kind, for the "conv" (LoCon) set.
UNET_CONV_BLOCKS: dict[type, tuple[str, ...]] = {
    ResnetBlock2D: ("conv1", "conv2", "conv_shortcut", "time_emb_proj"),
    Downsample2D: ("conv",),
    Upsample2D: ("conv",),
}
TEXT_ENCODER_BLOCKS: dict[type, tuple[str, ...]] = {
    CLIPAttention: ("q_proj", "k_proj", "v_proj", "out_proj"),
    CLIPMLP: ("fc1", "fc2"),
}


@dataclass(frozen=True)
class Target:
    lora_name: str
    layer: nn.Module

    @property
    def is_conv_kxk(self) -> bool:
        return isinstance(self.layer, nn.Conv2d) and self.layer.kernel_size != (1, 1)


def kohya_name(prefix: str, module_path: str) -> str:
    return f"{prefix}_{module_path}".replace(".", "_")


def text_encoder_path(module_path: str) -> str:
    """transformers >= 5.6 flattened CLIPTextModel (no `text_model.`); every
    loader expects the old path, so always export that."""
    return module_path if module_path.startswith("text_model.") else f"text_model.{module_path}"


def _is_attention_layer(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Linear) or (
        isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1)
    )


def unet_targets(unet: nn.Module, conv: bool) -> Iterator[Target]:
    """Every Linear / 1x1 conv inside a Transformer2DModel (192 in SD1.5), plus
    with `conv` the resnet, time-embedding and resampler layers (LoCon set)."""
    for path, block in unet.named_modules():
        if isinstance(block, Transformer2DModel):
            for child_path, layer in block.named_modules():
                if child_path and _is_attention_layer(layer):
                    yield Target(kohya_name(UNET_PREFIX, f"{path}.{child_path}"), layer)
        elif conv and type(block) in UNET_CONV_BLOCKS:
            for child in UNET_CONV_BLOCKS[type(block)]:
                layer = getattr(block, child, None)
                if layer is not None:
                    yield Target(kohya_name(UNET_PREFIX, f"{path}.{child}"), layer)


def text_encoder_targets(text_encoder: nn.Module) -> Iterator[Target]:
    """q/k/v/out_proj and mlp.fc1/fc2 of every CLIP layer (72 in SD1.5)."""
    for path, block in text_encoder.named_modules():
        for child in TEXT_ENCODER_BLOCKS.get(type(block), ()):
            full = text_encoder_path(f"{path}.{child}")
            yield Target(kohya_name(TEXT_ENCODER_PREFIX, full), getattr(block, child))


def all_layers_by_name(
    unet: nn.Module | None, text_encoder: nn.Module | None
) -> dict[str, nn.Module]:
    """kohya name -> layer, for every Linear/Conv2d (used when loading a file)."""
    names: dict[str, nn.Module] = {}
    for prefix, model, to_path in (
        (UNET_PREFIX, unet, lambda p: p),
        (TEXT_ENCODER_PREFIX, text_encoder, text_encoder_path),
    ):
        if model is None:
            continue
        for path, layer in model.named_modules():
            if isinstance(layer, (nn.Linear, nn.Conv2d)):
                names[kohya_name(prefix, to_path(path))] = layer
    return names
