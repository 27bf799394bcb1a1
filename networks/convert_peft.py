"""diffusers / PEFT LoRA keys -> kohya modules (`lora_down`, `lora_up`, `alpha`).

The layouts read, as diffusers' `StableDiffusionLoraLoaderMixin` still reads
them (its `utils/state_dict_utils.py` maps the older ones to PEFT's):

- PEFT: `unet.<path>.lora_A.weight` / `.lora_B.weight` (`save_lora_weights`
  of a `get_peft_model_state_dict`), `text_encoder.<path>...`, or
  `base_model.model.<path>...` in a PEFT `save_pretrained` folder;
  DoRA adds `<path>.lora_magnitude_vector`.
- diffusers before PEFT: `<path>.lora.down.weight` / `.lora.up.weight`,
  the text encoder's `<path>.lora_linear_layer.down.weight`, and the
  attention-processor style `<attn>.processor.to_q_lora.down.weight`.

lora_A is kohya's down (r, in[, k, k]), lora_B its up (out, r[, 1, 1]).
PEFT's scale is lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA), per module
through `rank_pattern` / `alpha_pattern`; kohya's is alpha / rank, so the
file's alpha is that scale times the rank. Without a config or `.alpha` keys
diffusers applies scale 1, i.e. alpha = rank.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from .targets import TEXT_ENCODER_PREFIX, UNET_PREFIX, kohya_name, text_encoder_path

UNET, TEXT_ENCODER = "unet", "text_encoder"
PEFT_WRAPPER = "base_model.model."
_UNET_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in.", "conv_out.",
               "conv_norm_out.", "time_embedding.")
_TEXT_ROOTS = ("text_model.", "encoder.layers.")
# (pattern over the key after the component, key style, role)
_STYLES = (
    (re.compile(r"(.+?)\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight"), "attention processor"),
    (re.compile(r"(.+)\.lora\.(down|up)\.weight"), "lora.down/lora.up"),
    (re.compile(r"(.+)\.lora_linear_layer\.(down|up)\.weight"), "lora_linear_layer"),
    (re.compile(r"(.+)\.lora_(A|B)(?:\.default)?\.weight"), "PEFT lora_A/lora_B"),
)
_MAGNITUDE = re.compile(r"(.+)\.lora_magnitude_vector(?:\.default)?(?:\.weight)?")
_ALPHA = re.compile(r"(.+)\.alpha")
_ROLE = {"down": "down", "A": "down", "up": "up", "B": "up"}
_PROCESSOR_CHILD = {
    UNET: {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
    TEXT_ENCODER: {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"},
}


@dataclass(frozen=True)
class PeftKey:
    component: str  # UNET or TEXT_ENCODER
    path: str  # the layer's path in the component, as the file names it
    role: str  # "down", "up", "magnitude" or "alpha"
    style: str


def parse_key(key: str) -> PeftKey | None:
    """What one tensor key of a diffusers/PEFT file is, None if not a LoRA key."""
    component, rest = _component(key)
    if component is None:
        return None
    rest = rest.replace(".processor.", ".")
    for pattern, style in _STYLES:
        if match := pattern.fullmatch(rest):
            path = match[1]
            if style == "attention processor":
                path = f"{path}.{_PROCESSOR_CHILD[component][match[2]]}"
            return PeftKey(component, _layer_path(component, path), _ROLE[match[match.lastindex]],
                           style)
    for pattern, role in ((_MAGNITUDE, "magnitude"), (_ALPHA, "alpha")):
        if match := pattern.fullmatch(rest):
            return PeftKey(component, _layer_path(component, match[1]), role, "")
    return None


def _component(key: str) -> tuple[str | None, str]:
    for prefix, component in (("unet.", UNET), ("text_encoder.", TEXT_ENCODER)):
        if key.startswith(prefix):
            return component, key.removeprefix(prefix)
    rest = key.removeprefix(PEFT_WRAPPER)
    if rest.startswith(_UNET_ROOTS):
        return UNET, rest
    if rest.startswith(_TEXT_ROOTS):
        return TEXT_ENCODER, rest
    return None, key


def _layer_path(component: str, path: str) -> str:
    # `to_out` is a ModuleList; its Linear is `to_out.0` (older DoRA keys omit it).
    return f"{path}.0" if component == UNET and path.endswith(".to_out") else path


def module_name(component: str, path: str) -> str:
    if component == UNET:
        return kohya_name(UNET_PREFIX, path)
    return kohya_name(TEXT_ENCODER_PREFIX, text_encoder_path(path))


@dataclass
class LoraConfigScale:
    """The part of a PEFT `LoraConfig` that sets each module's scale."""

    r: int
    lora_alpha: float
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    source: str = "adapter_config.json"

    @classmethod
    def from_dict(cls, config: dict, source: str) -> LoraConfigScale:
        peft_type = config.get("peft_type", "LORA")
        if peft_type not in (None, "LORA"):
            raise ValueError(f"{source} describes a PEFT {peft_type} adapter; only LoRA "
                             "(peft_type LORA) converts to a kohya LoRA file")
        r = int(config.get("r", 8))
        return cls(r=r, lora_alpha=float(config.get("lora_alpha", r)),
                   rank_pattern=dict(config.get("rank_pattern") or {}),
                   alpha_pattern=dict(config.get("alpha_pattern") or {}),
                   use_rslora=bool(config.get("use_rslora", False)), source=source)

    def scale(self, path: str) -> tuple[float, int]:
        """(PEFT's scale, the configured rank) of the layer at `path`."""
        rank = int(_pattern_value(self.rank_pattern, path, self.r))
        alpha = float(_pattern_value(self.alpha_pattern, path, self.lora_alpha))
        return alpha / (math.sqrt(rank) if self.use_rslora else rank), rank


def _pattern_value(patterns: dict, path: str, default):
    # PEFT's own rule (peft.utils.other.get_pattern_key): the first pattern
    # that matches the end of the module's path, at a dot boundary.
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return value
    return default


def configs_from_metadata(adapter_metadata: dict) -> dict[str, LoraConfigScale]:
    """diffusers' `lora_adapter_metadata` header entry: LoraConfig fields
    under `unet.` / `text_encoder.` prefixes."""
    configs = {}
    for component in (UNET, TEXT_ENCODER):
        fields = {k.removeprefix(f"{component}."): v for k, v in adapter_metadata.items()
                  if k.startswith(f"{component}.")}
        if "r" in fields:
            configs[component] = LoraConfigScale.from_dict(fields, "lora_adapter_metadata")
    return configs


def kohya_module(
    key: PeftKey, parts: dict[str, torch.Tensor], config: LoraConfigScale | None
) -> dict[str, torch.Tensor]:
    """One layer's kohya tensors from its PEFT parts; ValueError when they do not fit."""
    down, up = parts["down"], parts["up"]
    rank = down.shape[0]
    if up.dim() < 2 or up.shape[1] != rank or up.dim() != down.dim():
        raise ValueError(f"lora_A {tuple(down.shape)} and lora_B {tuple(up.shape)} do not "
                         "make one low-rank update")
    if config is not None:
        scale, configured = config.scale(key.path)
        if configured != rank:
            raise ValueError(f"{config.source} gives rank {configured}, the tensors rank {rank}")
        alpha = scale * rank
    elif "alpha" in parts:
        alpha = float(parts["alpha"])
    else:
        alpha = float(rank)
    tensors = {"lora_down.weight": down, "lora_up.weight": up,
               "alpha": torch.tensor(alpha, dtype=torch.float32)}
    if "magnitude" in parts:
        tensors["dora_scale"] = _output_axis_magnitude(parts["magnitude"], up.shape[0], down.dim())
    return tensors


def _output_axis_magnitude(magnitude: torch.Tensor, out: int, dims: int) -> torch.Tensor:
    """PEFT's magnitude is one norm per output channel, (out,) for a Linear and
    (1, out, 1, 1) for a conv; the file's output axis is (out, 1[, 1, 1])
    (docs/FORMATS.md "DoRA", `networks/dora.py`)."""
    if magnitude.numel() != out:
        raise ValueError(f"lora_magnitude_vector has shape {tuple(magnitude.shape)}, not one "
                         f"value per output channel ({out})")
    return magnitude.reshape(out, *([1] * (dims - 1)))
