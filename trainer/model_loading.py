"""Load an SD 1.x base model from a diffusers folder or a single-file checkpoint.

Never touches a model hub: diffusers folders load with
`local_files_only=True`, single files through `trainer.single_file` with the
shipped SD1.5 configs. The diffusers folder layout is the one written by
`DiffusionPipeline.save_pretrained` (https://huggingface.co/docs/diffusers/
api/pipelines/overview); the single-file layout is CompVis/stable-diffusion's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.errors import UserError
from trainer.sd15_config import load_sd15_config

# subfolder -> (config file, weight file stem) of the parts we need.
_FOLDER_PARTS = {
    "unet": ("config.json", "diffusion_pytorch_model"),
    "vae": ("config.json", "diffusion_pytorch_model"),
    "text_encoder": ("config.json", "model"),
    "scheduler": ("scheduler_config.json", None),
}


@dataclass
class SDModel:
    """The parts of an SD1.x model that training and sampling need."""

    unet: Any  # diffusers.UNet2DConditionModel
    vae: Any  # diffusers.AutoencoderKL
    text_encoder: Any  # transformers.CLIPTextModel
    tokenizer: Any  # transformers.CLIPTokenizer
    noise_scheduler: Any  # diffusers.DDPMScheduler, for training
    prediction_type: str  # "epsilon" or "v_prediction"
    source: Path
    # The model's own scheduler config, kept for building a sampler.
    scheduler_config: dict = field(default_factory=dict)


def load_sd_model(
    path: str | Path,
    *,
    allow_pickle: bool = False,
    dtype: torch.dtype = torch.float32,
    v_parameterization: bool = False,
) -> SDModel:
    """Load an SD1.x model from a diffusers folder or a single-file checkpoint.

    `v_parameterization` only applies to single files, which do not record
    their prediction type; diffusers folders say it in their scheduler config.
    Every user-fixable problem raises `UserError`.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(
            f"{path} does not exist; expected a Stable Diffusion 1.x .safetensors file or a "
            "diffusers folder containing model_index.json."
        )
    if path.is_dir():
        return _load_folder(path, allow_pickle=allow_pickle, dtype=dtype)
    return _load_single_file(
        path, allow_pickle=allow_pickle, dtype=dtype, v_parameterization=v_parameterization
    )


def _load_single_file(
    path: Path, *, allow_pickle: bool, dtype: torch.dtype, v_parameterization: bool
) -> SDModel:
    from diffusers import DDPMScheduler

    from trainer.checkpoint_io import read_checkpoint
    from trainer.single_file import models_from_checkpoint
    from trainer.tokenizer import load_offline_tokenizer

    checkpoint = read_checkpoint(path, allow_pickle=allow_pickle)
    unet, vae, text_encoder = models_from_checkpoint(checkpoint, path, dtype)
    del checkpoint
    prediction_type = "v_prediction" if v_parameterization else "epsilon"
    scheduler_config = {**load_sd15_config("scheduler"), "prediction_type": prediction_type}
    return SDModel(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=load_offline_tokenizer(),
        noise_scheduler=DDPMScheduler.from_config(scheduler_config),
        prediction_type=prediction_type,
        source=path,
        scheduler_config=scheduler_config,
    )


def _weight_options(folder: Path, part: str, stem: str, allow_pickle: bool) -> dict:
    """from_pretrained options for the weight files present (safetensors first)."""
    part_dir = folder / part
    for variant in (None, "fp16"):
        infix = f".{variant}" if variant else ""
        if any(part_dir.glob(f"{stem}{infix}.safetensors*")) or any(
            part_dir.glob(f"{stem}{infix}-*.safetensors")
        ):
            return {"use_safetensors": True, "variant": variant}
    pickle_names = ("diffusion_pytorch_model", "pytorch_model")
    for variant in (None, "fp16"):
        infix = f".{variant}" if variant else ""
        if any(any(part_dir.glob(f"{name}{infix}*.bin")) for name in pickle_names):
            if not allow_pickle:
                raise UserError(
                    f"{part_dir} only has pickle (.bin) weights, which can run arbitrary code "
                    "when loaded; expected .safetensors weights, so convert the folder, or allow "
                    "pickle checkpoints (allow_pickle) only if you trust where it came from."
                )
            return {"use_safetensors": False, "variant": variant}
    raise UserError(
        f"{part_dir} has no weight files; expected {stem}.safetensors in a complete diffusers "
        "Stable Diffusion folder."
    )


def _read_json(file: Path, what: str) -> dict:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"{file} could not be read ({error}); expected a valid {what}.") from error


def _load_folder(path: Path, *, allow_pickle: bool, dtype: torch.dtype) -> SDModel:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from trainer.tokenizer import load_offline_tokenizer

    if not (path / "model_index.json").is_file():
        raise UserError(
            f"{path} is a folder without model_index.json; expected a diffusers Stable "
            "Diffusion folder or a single .safetensors checkpoint file."
        )
    index = _read_json(path / "model_index.json", "diffusers model_index.json")
    if "text_encoder_2" in index or "XL" in str(index.get("_class_name", "")):
        raise UserError(
            f"{path} looks like an SDXL model ({index.get('_class_name')}); expected a "
            "Stable Diffusion 1.x diffusers folder."
        )
    options = {}
    for part, (config_name, stem) in _FOLDER_PARTS.items():
        if not (path / part / config_name).is_file():
            raise UserError(
                f"{path} is missing its {part} component ({part}/{config_name}); expected a "
                "complete diffusers folder with unet, vae, text_encoder and scheduler subfolders."
            )
        if stem:
            options[part] = _weight_options(path, part, stem, allow_pickle)

    common = {"local_files_only": True}
    try:
        unet = UNet2DConditionModel.from_pretrained(
            path, subfolder="unet", torch_dtype=dtype, **options["unet"], **common
        )
        vae = AutoencoderKL.from_pretrained(
            path, subfolder="vae", torch_dtype=dtype, **options["vae"], **common
        )
        text_encoder = CLIPTextModel.from_pretrained(
            path, subfolder="text_encoder", dtype=dtype, **options["text_encoder"], **common
        )
    except Exception as error:
        # Broken folders surface as OSError, ValueError, RuntimeError or
        # SafetensorError depending on the library and the damage.
        raise UserError(
            f"{path} could not be loaded as a diffusers folder ({error}); expected complete, "
            "uncorrupted Stable Diffusion 1.x weights."
        ) from error

    tokenizer_dir = path / "tokenizer"
    if any((tokenizer_dir / name).is_file() for name in ("tokenizer.json", "vocab.json")):
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **common)
    else:
        tokenizer = load_offline_tokenizer()

    scheduler_config = _read_json(path / "scheduler" / "scheduler_config.json", "scheduler config")
    prediction_type = scheduler_config.get("prediction_type", "epsilon")
    return SDModel(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        noise_scheduler=DDPMScheduler.from_config(scheduler_config),
        prediction_type=prediction_type,
        source=path,
        scheduler_config=scheduler_config,
    )


def build_pipeline(sd_model: SDModel, scheduler=None, vae=None):
    """A `StableDiffusionPipeline` sharing the loaded modules (no copies).

    The safety checker is left out. `scheduler` defaults to DDIM from the
    model's scheduler config (works in few steps and with v-prediction);
    `vae` to the model's own (a preview may decode with TAESD instead).
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    if scheduler is None:
        scheduler = DDIMScheduler.from_config(sd_model.scheduler_config)
    return StableDiffusionPipeline(
        vae=sd_model.vae if vae is None else vae,
        text_encoder=sd_model.text_encoder,
        tokenizer=sd_model.tokenizer,
        unet=sd_model.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
