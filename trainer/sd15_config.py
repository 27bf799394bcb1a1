"""The shipped SD1.5 component configs and random-weight SD1.5 models.

`configs/sd15/` holds the configs of the public Stable Diffusion v1.5
diffusers layout (runwayml/stable-diffusion-v1-5 `model_index.json`,
`unet/config.json`, `vae/config.json`, `text_encoder/config.json`,
`scheduler/scheduler_config.json`), written out so that single-file
checkpoints load without fetching them from a hub. Differences from the
published files: the safety checker and feature extractor are null, and the
scheduler names `prediction_type` explicitly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

SD15_CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "sd15"

_CONFIG_FILES = {
    "model_index": "model_index.json",
    "unet": "unet/config.json",
    "vae": "vae/config.json",
    "text_encoder": "text_encoder/config.json",
    "scheduler": "scheduler/scheduler_config.json",
}


def load_sd15_config(component: str) -> dict[str, Any]:
    """A fresh copy of one shipped SD1.5 config (`unet`, `vae`, `text_encoder`,
    `scheduler` or `model_index`); callers may mutate it."""
    try:
        relative = _CONFIG_FILES[component]
    except KeyError:
        raise ValueError(f"unknown SD1.5 component {component!r}") from None
    return json.loads((SD15_CONFIG_DIR / relative).read_text(encoding="utf-8"))


class SD15Components(NamedTuple):
    """Random-weight SD1.5-architecture models; `vae` is None unless asked."""

    unet: Any
    text_encoder: Any
    vae: Any = None


def build_sd15_from_config(
    with_vae: bool = False, *, seed: int | None = 0, device: str | None = None
) -> SD15Components:
    """SD1.5-size U-Net (~859M parameters) and CLIP ViT-L/14 text encoder
    (~123M), randomly initialised from the shipped configs, no weights file.

    Meant for benchmarks and architecture tests, where the real weights do
    not matter but the shapes and module names must. `seed` makes the random
    weights repeatable (None leaves the global RNG alone). `device="meta"`
    builds the modules without allocating or initialising weights (well
    under a second instead of ~13 s on a 2-core CPU) for structure checks.
    """
    from contextlib import nullcontext

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device) if device is not None else nullcontext():
        unet = UNet2DConditionModel.from_config(load_sd15_config("unet"))
        text_encoder = CLIPTextModel(CLIPTextConfig(**load_sd15_config("text_encoder")))
        vae = AutoencoderKL.from_config(load_sd15_config("vae")) if with_vae else None
    return SD15Components(unet=unet, text_encoder=text_encoder, vae=vae)
