"""Kohya-style module names other tools write, renamed to the ones every loader
reads (docs/FORMATS.md "Module names"); the tensors stay as they are.

- LDM-layout U-Net names (`lora_unet_input_blocks_1_1_proj_in`): ComfyUI
  reads them, A1111 and diffusers do not (`networks/ldm_names.py`).
- Text-encoder names without `text_model_` (`lora_te_encoder_layers_0_...`):
  what lycoris-lora 4.1 derives from transformers >= 5.6, which no loader maps.
- lycoris-lora's own wrapper prefix (`lycoris_<path>`, `create_lycoris`):
  the model is told apart by the path's first part.
"""

from __future__ import annotations

from .ldm_names import is_ldm_name, ldm_to_diffusers
from .targets import TEXT_ENCODER_PREFIX, UNET_PREFIX

KIND_UNCHANGED = "already in this layout"
KIND_LDM = "LDM U-Net name -> diffusers layout"
KIND_TEXT_MODEL = "text-encoder name given its text_model_"
KIND_LYCORIS = "lycoris_ prefix -> lora_unet_/lora_te_"

UNET_ROOTS = ("down_blocks_", "mid_block_", "up_blocks_", "conv_in", "conv_out",
              "conv_norm_out", "time_embedding_")
TEXT_ROOTS = ("text_model_", "encoder_layers_", "embeddings_", "final_layer_norm")
SDXL_PREFIXES = ("lora_te1_", "lora_te2_")


def rename_module(name: str) -> tuple[str, str] | None:
    """(new name, kind of change) for a kohya-style module name, None when it
    names nothing an SD 1.x loader applies."""
    if name.startswith(SDXL_PREFIXES):
        return None
    if name.startswith(f"{UNET_PREFIX}_"):
        return _unet(name.removeprefix(f"{UNET_PREFIX}_"), KIND_UNCHANGED)
    if name.startswith(f"{TEXT_ENCODER_PREFIX}_"):
        return _text(name.removeprefix(f"{TEXT_ENCODER_PREFIX}_"), KIND_UNCHANGED)
    if name.startswith("lycoris_"):
        rest = name.removeprefix("lycoris_")
        if rest.startswith(TEXT_ROOTS):
            return _text(rest, KIND_LYCORIS)
        if rest.startswith(UNET_ROOTS) or is_ldm_name(rest):
            return _unet(rest, KIND_LYCORIS)
    return None


def _unet(rest: str, kind: str) -> tuple[str, str] | None:
    if not is_ldm_name(rest):
        return f"{UNET_PREFIX}_{rest}", kind
    mapped = ldm_to_diffusers(rest)
    if mapped is None:
        return None
    return f"{UNET_PREFIX}_{mapped}", KIND_LDM if kind == KIND_UNCHANGED else kind


def _text(rest: str, kind: str) -> tuple[str, str] | None:
    if not rest.startswith(TEXT_ROOTS):
        return None
    if rest.startswith("text_model_"):
        return f"{TEXT_ENCODER_PREFIX}_{rest}", kind
    new_kind = KIND_TEXT_MODEL if kind == KIND_UNCHANGED else kind
    return f"{TEXT_ENCODER_PREFIX}_text_model_{rest}", new_kind
