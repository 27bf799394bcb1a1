"""What the memory estimate needs to know of the base model, without loading it:
its component configs (read from a diffusers folder's config files, a single
file's tensor shapes, or the demo's and SD1.5's shipped ones) and the bytes
of its weights in each storage precision."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from core.errors import UserError
from trainer.config_schema import DEMO
from trainer.demo_toy import TOY_MODEL_KEYWORD
from trainer.sd15_config import load_sd15_config

# bitsandbytes NF4 with double quantization, as trainer/quantized_weight.py
# stores it: 4-bit codes, an 8-bit absmax per 64 weights and an fp32 one per
# 256 of those blocks.
NF4_BLOCK = 64
NF4_BLOCKS_PER_ABSMAX = 256
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "no": 4}


@dataclass(frozen=True)
class ModelConfigs:
    unet: dict
    text_encoder: dict
    vae: dict
    source: str  # where the shapes came from, for the report


def model_configs(config) -> ModelConfigs:
    path = config.model.path
    if path == DEMO:
        from trainer.demo_model import DEMO_TEXT, DEMO_UNET, DEMO_VAE

        return ModelConfigs({**load_sd15_config("unet"), **DEMO_UNET},
                            {**load_sd15_config("text_encoder"), **DEMO_TEXT},
                            {**load_sd15_config("vae"), **DEMO_VAE}, "the demo model")
    if path == TOY_MODEL_KEYWORD:
        from trainer.demo_model import DEMO_TEXT
        from trainer.demo_toy import TOY_UNET, TOY_VAE

        return ModelConfigs({**load_sd15_config("unet"), **TOY_UNET},
                            {**load_sd15_config("text_encoder"), **DEMO_TEXT},
                            {**load_sd15_config("vae"), **TOY_VAE}, "the toy demo model")
    if not path:
        return _sd15("SD1.5's shapes (model.path is empty)")
    file = Path(path).expanduser()
    if file.is_dir():
        return _folder_configs(file)
    if not file.exists():
        raise UserError(f"model.path = {path} does not exist; expected a Stable Diffusion 1.x "
                        ".safetensors file, a diffusers folder, \"demo\" or \"demo-shapes\".")
    if file.suffix.lower() == ".safetensors":
        return _single_file_configs(file)
    return _sd15(f"SD1.5's shapes ({file.name} is not read without loading it)")


def _sd15(source: str) -> ModelConfigs:
    return ModelConfigs(load_sd15_config("unet"), load_sd15_config("text_encoder"),
                        load_sd15_config("vae"), source)


def _folder_configs(folder: Path) -> ModelConfigs:
    parts = {}
    for part in ("unet", "text_encoder", "vae"):
        file = folder / part / "config.json"
        try:
            parts[part] = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise UserError(f"{file} could not be read ({error}); model.path = {folder} must be "
                            "a complete diffusers Stable Diffusion 1.x folder.") from error
    return ModelConfigs(parts["unet"], parts["text_encoder"], parts["vae"], str(folder))


class _Shape:
    """What the single-file config inference reads of a tensor."""

    def __init__(self, shape) -> None:
        self.shape = tuple(shape)
        self.ndim = len(self.shape)


def _single_file_configs(file: Path) -> ModelConfigs:
    """The configs `trainer.single_file` infers at load time, from the header alone."""
    from networks.file_header import read_header
    from trainer.ldm_keys import UNET_PREFIX, VAE_PREFIX
    from trainer.single_file import (
        infer_text_config,
        infer_unet_config,
        infer_vae_config,
        text_state_dict,
    )

    shapes = {key: _Shape(info.shape) for key, info in read_header(file).tensors.items()}

    def strip(prefix: str) -> dict:
        return {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}

    try:
        unet = infer_unet_config(strip(UNET_PREFIX))
        vae = infer_vae_config(strip(VAE_PREFIX))
        text = infer_text_config(text_state_dict(shapes))
    except (KeyError, ValueError, IndexError):
        return _sd15(f"SD1.5's shapes ({file.name} has no SD1.x layout the header shows)")
    return ModelConfigs(unet, text, vae, str(file))


def weight_bytes(model, storage: str, compute: str) -> int:
    """Bytes of a (meta) model's parameters and buffers stored as `storage`, as
    trainer/base_precision.py stores them: fp32/fp16/bf16 as such; fp8 one byte
    per Linear/Conv weight plus an fp32 scale per output channel; nf4 the
    Linear weights in NF4 and the convolutions in fp8. What fp8/nf4 leave
    (biases, norms, embeddings) is kept in the `compute` dtype."""
    plain = DTYPE_BYTES[storage] if storage in DTYPE_BYTES else DTYPE_BYTES[compute]
    total = 0
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            kind = quantized_as(module, storage) if name == "weight" else None
            total += quantized_bytes(param, kind) if kind else param.numel() * plain
        for buffer in module.buffers(recurse=False):
            total += buffer.numel() * buffer.element_size()
    return total


def quantized_as(module, storage: str) -> str | None:
    """"fp8", "nf4" or None: how `storage` keeps this module's weight."""
    from torch import nn

    if storage not in ("fp8", "nf4") or type(module) not in (nn.Linear, nn.Conv2d):
        return None
    return "nf4" if storage == "nf4" and type(module) is nn.Linear else "fp8"


def quantized_bytes(weight, kind: str) -> int:
    n = weight.numel()
    if kind == "fp8":
        return n + 4 * weight.shape[0]
    blocks = math.ceil(n / NF4_BLOCK)
    return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / NF4_BLOCKS_PER_ABSMAX)


def largest_layer_bytes(model, storage: str, compute: str) -> int:
    """The biggest quantized weight upcast to the compute dtype: fp8/nf4 layers
    are dequantized one at a time in the step."""
    sizes = [m.weight.numel() for m in model.modules() if quantized_as(m, storage)]
    return max(sizes, default=0) * DTYPE_BYTES[compute]
