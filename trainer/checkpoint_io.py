"""Reading single-file checkpoints safely, and telling users what a file is.

`.safetensors` is read without executing anything. Pickle formats
(`.ckpt`, `.pt`, `.pth`, `.bin`) can run arbitrary code when unpickled
(https://pytorch.org/docs/stable/generated/torch.load.html, "weights_only"),
so they are refused unless the caller opts in, and even then only
`torch.load(weights_only=True)` is used.

Key prefixes of the original SD1.x layout come from CompVis/stable-diffusion
`configs/stable-diffusion/v1-inference.yaml` (model.diffusion_model,
first_stage_model, cond_stage_model); SDXL's from
Stability-AI/generative-models (`conditioner.embedders.*`).
"""

from __future__ import annotations

from pathlib import Path

from core.errors import UserError
from trainer.ldm_keys import UNET_PREFIX, VAE_PREFIX

# Both SD1.x text layouts live under it: `...transformer.text_model.*` and,
# in some early files saved with older transformers, `...transformer.*` directly.
TEXT_ROOT_PREFIX = "cond_stage_model.transformer."
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}

_LORA_MARKERS = (".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", ".hada_w1_a", ".lokr_w1")
_LORA_PREFIXES = ("lora_unet_", "lora_te", "lycoris_")


def safetensors_keys(path: Path) -> list[str]:
    """Tensor names from the header only (cheap even for multi-GB files)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError) as error:
        raise _corrupt(path, error) from error


def _corrupt(path: Path, error: Exception) -> UserError:
    return UserError(
        f"{path} could not be read as a safetensors file ({error}); it is probably truncated "
        "or corrupt, so download or export the Stable Diffusion 1.x checkpoint again."
    )


def read_checkpoint(path: Path, allow_pickle: bool = False) -> dict:
    """All tensors of a single-file checkpoint, on the CPU.

    Refuses files that are not SD1.x before reading any tensor data.
    """
    import torch

    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        check_sd1_keys(path, safetensors_keys(path))
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as error:
            raise _corrupt(path, error) from error
    if suffix not in PICKLE_SUFFIXES:
        raise UserError(
            f"{path} has an unsupported extension {suffix or '(none)'}; expected a Stable "
            "Diffusion 1.x .safetensors file or a diffusers folder containing model_index.json."
        )
    if not allow_pickle:
        raise UserError(
            f"{path} is a pickle checkpoint, which can run arbitrary code when loaded; expected "
            "a .safetensors file, so convert it, or set model.allow_pickle = true "
            "only if you trust where it came from."
        )
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(
            f"{path} could not be loaded with torch.load(weights_only=True) ({error}); expected "
            "a checkpoint holding only tensors, so convert it to .safetensors with a trusted tool."
        ) from error
    # Lightning / original SD checkpoints wrap the weights in "state_dict".
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise UserError(
            f"{path} holds a {type(loaded).__name__}, not a state dict; expected a Stable "
            "Diffusion 1.x checkpoint."
        )
    tensors = {k: v for k, v in loaded.items() if isinstance(k, str) and torch.is_tensor(v)}
    check_sd1_keys(path, list(tensors))
    return tensors


def check_sd1_keys(path: Path, keys: list[str]) -> None:
    """Raise a UserError saying what the file looks like unless it is SD1.x."""
    has_unet = any(k.startswith(UNET_PREFIX) for k in keys)
    if any(k.startswith("conditioner.embedders.") for k in keys) or (
        UNET_PREFIX + "label_emb.0.0.weight" in keys
    ):
        looks_like = "it looks like an SDXL checkpoint (conditioner.embedders.* keys)"
    elif any(k.startswith("cond_stage_model.model.") for k in keys):
        looks_like = "it looks like a Stable Diffusion 2.x checkpoint (OpenCLIP text encoder)"
    elif has_unet:
        missing = [
            name
            for name, prefix in (("VAE", VAE_PREFIX), ("text encoder", TEXT_ROOT_PREFIX))
            if not any(k.startswith(prefix) for k in keys)
        ]
        if not missing:
            return
        looks_like = (
            f"it has U-Net weights but no {' and no '.join(missing)} weights "
            f"({VAE_PREFIX}* / {TEXT_ROOT_PREFIX}*), so it is not a full checkpoint"
        )
    elif any(k.startswith(_LORA_PREFIXES) or any(m in k for m in _LORA_MARKERS) for k in keys):
        looks_like = (
            "it looks like a LoRA/LyCORIS adapter, which is applied on top of a base model "
            "rather than loaded as one"
        )
    elif any(k.startswith(("down_blocks.", "encoder.layers.", "text_model.")) for k in keys):
        looks_like = (
            "it looks like the weights of a single diffusers/transformers component; pass the "
            "diffusers folder that contains model_index.json instead"
        )
    elif not keys:
        looks_like = "it holds no tensors at all"
    else:
        sample = ", ".join(repr(k) for k in sorted(keys)[:3])
        looks_like = f"it holds {len(keys)} tensor(s) named like {sample}"
    raise UserError(
        f"{path} is not a Stable Diffusion 1.x checkpoint: expected U-Net weights named "
        f"{UNET_PREFIX}* with {VAE_PREFIX}* and {TEXT_ROOT_PREFIX}*, but {looks_like}."
    )
