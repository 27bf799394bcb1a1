"""What one training step computes: its noise and timesteps (a function of
seed and step), the device and mixed-precision context, and the loss of a
batch (plain denoising, or LCM distillation), with the text embeddings and
latents it needs. `trainer/train.py` runs the loop around it."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from trainer import diffusion
from trainer.text_encoding import encode_captions


def step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """Noise and timesteps are a function of (seed, step): a resumed run and a
    run on any number of processes draw exactly the same ones."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_009 + micro) % 2**63)


@dataclass
class StepContext:
    """Device and mixed precision: autocast for the frozen model's compute, a
    gradient scaler for fp16 (a no-op otherwise); adapter weights stay fp32."""

    device: torch.device
    mixed_precision: str
    text_cache: object = None  # TextEmbeddingCache while the text encoder is frozen
    lcm_target: object = None  # trainer.lcm.EmaTarget when lcm.target_ema is set
    unet: object = None  # the U-Net the step calls (compiled with train.compile); None: sd.unet

    def __post_init__(self):
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.mixed_precision == "fp16")

    def autocast(self):
        if self.mixed_precision == "no":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.mixed_precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def step_unet(self, sd):
        return sd.unet if self.unet is None else self.unet


def training_loss(config, sd, network, tb, mine, generator, train_text_encoder, ctx):
    """Sum over this process's slice of the per-sample weighted losses."""
    if config.task == "lcm_distill":
        return lcm_distillation_loss(config, sd, network, tb, mine, generator, ctx)
    latents = latents_of(sd, tb)
    noise = diffusion.make_noise(latents.shape, generator, config.train.noise_offset)
    scheduler = sd.noise_scheduler
    timesteps = diffusion.sample_timesteps(
        len(latents), scheduler.config.num_train_timesteps, generator
    )
    weights = diffusion.loss_weights(scheduler, timesteps, config.train.min_snr_gamma)
    captions = tb.captions[mine]
    if not captions:  # the last, short batch may leave a process nothing to do
        return torch.zeros((), device=ctx.device, requires_grad=True)
    device = ctx.device
    latents, noise, timesteps = latents[mine].to(device), noise[mine].to(device), timesteps[mine]
    timesteps = timesteps.to(device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = diffusion.compute_target(scheduler, latents, noise, timesteps)
    with ctx.autocast():
        text = caption_embeddings(config, sd, captions, train_text_encoder, ctx)
        unet = ctx.step_unet(sd)
        prediction = unet(noisy.to(sd.unet.dtype), timesteps, text.to(sd.unet.dtype)).sample
    mask = tb.masks[mine] if tb.masks is not None else None  # dataset.masked_loss
    per_sample = diffusion.per_sample_mse(prediction, target, mask)
    weights = weights * reg_weights(tb, config.train.prior_loss_weight)  # kohya loss_weights
    return (per_sample * weights[mine].to(device)).sum()


def reg_weights(tb, prior_loss_weight: float) -> torch.Tensor:
    """1 per training sample, `prior_loss_weight` per reg sample (dataset.reg_path)."""
    is_reg = tb.is_reg or (False,) * len(tb.captions)
    return torch.tensor([prior_loss_weight if reg else 1.0 for reg in is_reg])


def lcm_distillation_loss(config, sd, network, tb, mine, generator, ctx):
    """LCM-LoRA (trainer.lcm): the U-Net with adapters off is the teacher."""
    from trainer import lcm

    captions = tb.captions[mine]
    if not captions:
        return torch.zeros((), device=ctx.device, requires_grad=True)
    text = caption_embeddings(config, sd, captions, False, ctx)
    uncond = caption_embeddings(config, sd, [""], False, ctx)
    latents = latents_of(sd, tb)[mine].to(ctx.device)
    loss = lcm.distillation_loss(
        ctx.step_unet(sd), network, latents, text.to(sd.unet.dtype), uncond.to(sd.unet.dtype),
        sd.noise_scheduler, generator, config.lcm.w_min, config.lcm.w_max, config.lcm.loss,
        config.lcm.huber_c, autocast=ctx.autocast,
        num_ddim=config.lcm.num_ddim_timesteps,
        target_weights=ctx.lcm_target.swapped_in if ctx.lcm_target else contextlib.nullcontext,
    )  # fmt: skip
    return loss * len(captions)  # the mean over the slice -> its sum


def frozen_text_cache(config, sd):
    """Each caption encoded once, when the text encoder is not trained and the
    captions do not change between epochs (no shuffling or dropout)."""
    from datasets_tools.text_cache import TextEmbeddingCache

    @torch.no_grad()
    def encode(captions: list[str]) -> torch.Tensor:
        # One caption at a time: the result must not depend on which captions
        # happened to be encoded together (a resumed run groups them differently).
        return torch.cat([
            encode_captions(sd.text_encoder, sd.tokenizer, [c], config.model.clip_skip)
            for c in captions
        ])  # fmt: skip

    return TextEmbeddingCache(encode, encoder_id="this run")


def caption_embeddings(config, sd, captions, train_text_encoder: bool, ctx) -> torch.Tensor:
    if ctx.text_cache is not None:
        return ctx.text_cache.get_many(captions).to(ctx.device)
    with torch.set_grad_enabled(train_text_encoder):
        return encode_captions(sd.text_encoder, sd.tokenizer, captions, config.model.clip_skip)


@torch.no_grad()
def latents_of(sd, tb) -> torch.Tensor:
    if tb.latents is not None:
        return tb.latents.float()
    pixels = tb.pixels.to(sd.vae.device, sd.vae.dtype)
    latents = sd.vae.encode(pixels).latent_dist.mode() * sd.vae.config.scaling_factor
    return latents.float().cpu()
