"""Preview images: the base model with whatever adapters are attached.

The adapters hook the very U-Net and text encoder the pipeline runs, so a
preview shows exactly what the exported file will do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.text_encoding import encode_captions

SCHEDULERS = {
    "euler_a": "EulerAncestralDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "lcm": "LCMScheduler",
}


@dataclass(frozen=True)
class SampleSettings:
    prompts: tuple[str, ...]
    negative_prompt: str = ""
    steps: int = 20
    guidance: float = 7.0
    sampler: str = "euler_a"
    seed: int = 1234
    width: int = 512
    height: int = 512
    clip_skip: int = 1
    decoder: str = ""  # a TAESD folder (`trainer.preview_decoder`); "" = the model's VAE


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
    for index, prompt in enumerate(settings.prompts):
        generator = torch.Generator().manual_seed(settings.seed + index)
        result = pipe(
            prompt_embeds=encode(prompt),
            negative_prompt_embeds=encode(settings.negative_prompt),
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance,
            width=settings.width,
            height=settings.height,
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
