"""Preview images: the base model with whatever adapters are attached.

The adapters hook the very U-Net and text encoder the pipeline runs, so a
preview shows exactly what the exported file will do.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from core.errors import UserError
from trainer.prompt_options import PromptOptionError, parse_prompt
from trainer.sample_cli import LCM_MAX_STEPS
from trainer.text_encoding import encode_captions

SCHEDULERS = {
    "euler_a": "EulerAncestralDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "lcm": "LCMScheduler",
}


@dataclass(frozen=True)
class SampleSettings:
    prompts: tuple[str, ...]  # each may end in kohya options (`trainer.prompt_options`)
    negative_prompt: str = ""
    steps: int = 20
    guidance: float = 7.0
    sampler: str = "euler_a"
    seed: int = 1234
    width: int = 512
    height: int = 512
    clip_skip: int = 1
    decoder: str = ""  # a TAESD folder (`trainer.preview_decoder`); "" = the model's VAE


def per_prompt(settings: SampleSettings) -> list[SampleSettings]:
    """One settings per prompt, its options applied: the prompt's own text,
    negative prompt, size, steps, guidance and seed (`--d`, else the seed plus
    the prompt's index, so prompts differ and each stays the same every time)."""
    resolved = []
    for index, line in enumerate(settings.prompts):
        try:
            o = parse_prompt(line)
        except PromptOptionError as exc:
            raise UserError(f"{exc}.") from None
        steps = settings.steps if o.steps is None else o.steps
        if settings.sampler == "lcm" and steps > LCM_MAX_STEPS:
            raise UserError(f'prompt "{line}": --s {steps}: the LCM scheduler takes at most '
                            f"{LCM_MAX_STEPS} steps.")
        resolved.append(replace(
            settings, prompts=(o.text,), steps=steps,
            negative_prompt=settings.negative_prompt if o.negative is None else o.negative,
            guidance=settings.guidance if o.guidance is None else o.guidance,
            width=o.width or settings.width, height=o.height or settings.height,
            seed=settings.seed + index if o.seed is None else o.seed,
        ))  # fmt: skip
    return resolved


def make_scheduler(name: str, scheduler_config: dict):
    import diffusers

    return getattr(diffusers, SCHEDULERS[name]).from_config(scheduler_config)


@torch.no_grad()
def generate(sd, settings: SampleSettings) -> list:
    """One PIL image per prompt, each from its own seeded generator."""
    from trainer.model_loading import build_pipeline

    vae = None
    if settings.decoder:
        from trainer.preview_decoder import load_preview_decoder

        vae = load_preview_decoder(settings.decoder).to(sd.vae.device)
    scheduler = make_scheduler(settings.sampler, sd.scheduler_config)
    pipe = build_pipeline(sd, scheduler=scheduler, vae=vae)
    pipe.set_progress_bar_config(disable=True)

    # Prompts are encoded here, not by the pipeline, so clip skip means what it
    # means in training (and works with transformers' flattened CLIP).
    def encode(text: str) -> torch.Tensor:
        return encode_captions(sd.text_encoder, sd.tokenizer, [text], settings.clip_skip)

    images = []
    for one in per_prompt(settings):
        generator = torch.Generator().manual_seed(one.seed)
        result = pipe(
            prompt_embeds=encode(one.prompts[0]),
            negative_prompt_embeds=encode(one.negative_prompt),
            num_inference_steps=one.steps,
            guidance_scale=one.guidance,
            width=one.width,
            height=one.height,
            generator=generator,
            output_type="latent",
        )
        images.append(decode_image(pipe, result.images))
    return images


def decode_image(pipe, latents: torch.Tensor):
    """Decode in the decoder's own dtype: in bf16/fp16 training the U-Net makes
    half-precision latents while the VAE (or TAESD) stays fp32."""
    vae = pipe.vae
    pixels = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(pixels.float(), output_type="pil")[0]
