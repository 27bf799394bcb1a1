"""An optional tiny decoder for previews: TAESD (madebyollin/taesd, the
"approximate" live-preview decoder of A1111 and ComfyUI) in diffusers'
`AutoencoderTiny` layout.

The full SD VAE decoder costs about as much as three 512px U-Net calls, so in
a 4-step LCM preview it is close to half the time; TAESD decodes the same
latents in a small fraction of that, slightly softer. Exports never use it:
only what the preview PNGs are decoded with changes. Users bring the folder
(config.json + diffusion_pytorch_model.safetensors); nothing is downloaded.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from core.errors import UserError

HOW_TO_GET = (
    "expected a diffusers AutoencoderTiny folder for SD 1.x, such as madebyollin/taesd "
    "(config.json and diffusion_pytorch_model.safetensors)"
)


def check_decoder_folder(path: str | Path, setting: str) -> Path:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise UserError(f"{setting} = {path} is not a folder; {HOW_TO_GET}, or leave it empty "
                        "to decode previews with the model's own VAE.")  # fmt: skip
    config = folder / "config.json"
    if not config.is_file():
        raise UserError(f"{setting} = {path} has no config.json; {HOW_TO_GET}.")
    try:
        class_name = json.loads(config.read_text(encoding="utf-8")).get("_class_name")
    except (ValueError, UnicodeDecodeError, AttributeError):
        message = f"{setting} = {path}: config.json is not valid JSON; {HOW_TO_GET}."
        raise UserError(message) from None
    if class_name != "AutoencoderTiny":
        # diffusers would load another class's weights with a warning and random layers.
        raise UserError(f"{setting} = {path} holds a {class_name or 'model of unknown class'}, "
                        f"not an AutoencoderTiny; {HOW_TO_GET}.")  # fmt: skip
    return folder


@functools.lru_cache(maxsize=2)
def load_preview_decoder(path: str, setting: str = "sample.preview_decoder"):
    """The decoder in eval mode, loaded once per folder for the process."""
    from diffusers import AutoencoderTiny

    folder = check_decoder_folder(path, setting)
    try:
        decoder = AutoencoderTiny.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{setting} = {path} could not be loaded ({first_line}); "
                        f"{HOW_TO_GET}.") from exc  # fmt: skip
    if decoder.config.latent_channels != 4:
        raise UserError(f"{setting} = {path} decodes {decoder.config.latent_channels}-channel "
                        f"latents, but SD 1.x latents have 4; {HOW_TO_GET}.")  # fmt: skip
    return decoder.eval().requires_grad_(False)
