"""Pretrain the toy demo model and write its asset (`trainer/demo_toy.py`).

    python -m trainer.demo_toy_pretrain OUT.safetensors [--seed 0]

First the VAE learns to encode and decode random coloured polygons
(`demo_toy_data.vae_image`; `train_vae`, then `tune_vae_colours`), its
latents are rescaled to SD1.5's scaling factor, then the U-Net learns to
draw "a red circle",
"a blue square", ... (`demo_toy_data.base_captions`) in its latents, with a
frozen, seeded-random text encoder (`demo_toy.build_toy_components`) and
SD1.5's noise schedule and epsilon prediction, so the trainer and its
samplers treat it as any SD1.5 model. One caption in ten is empty during
U-Net training, so classifier-free guidance works.

Seeded: the same seed gives the same pictures, the same initial weights and
the same batches, noise and timesteps. The trained weights are the same bit
for bit on the same torch version and thread count (float sums may round
differently elsewhere). Run time: see `TIMING`.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import torch

# Measured with the defaults, one thread, on a 2-core CPU VM shared with other
# jobs (torch 2.13): VAE 8 min, its colours 5 min, U-Net 14-17 min; one whole
# run at nice 19 beside other jobs took 32 min and wrote the committed asset.
TIMING = "about 30 minutes"
VAE_STEPS, VAE_BATCH, VAE_LR = 1500, 16, 6e-4
VAE_FULL_SHARE = 0.15  # of the VAE steps, on whole 64-pixel pictures
VAE_COLOUR_STEPS, COLOUR_WEIGHT = 1000, 4.0
UNET_STEPS, UNET_BATCH, UNET_LR = 2000, 48, 1e-3
UNET_IMAGES_PER_CAPTION = 96
EMPTY_CAPTION_RATE = 0.1  # for classifier-free guidance
MIN_SNR_GAMMA = 5.0
KL_WEIGHT = 1e-6


def _pixels(images) -> torch.Tensor:
    import numpy as np

    array = np.stack([np.asarray(image, dtype=np.float32) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


def _lr(step: int, steps: int, peak: float, warmup: int = 50) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _set_lr(optimizer, value: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = value


def _vae_batch(rng: random.Random, batch: int, crop: int) -> torch.Tensor:
    """`batch` pictures, cut to a `crop`-pixel square at one latent-aligned place."""
    from trainer.demo_toy_data import SIZE, vae_image

    pixels = _pixels([vae_image(rng) for _ in range(batch)])
    if crop < SIZE:
        top, left = (rng.randrange(0, SIZE - crop + 1, 8) for _ in range(2))
        pixels = pixels[:, :, top:top + crop, left:left + crop]
    return pixels


def train_vae(vae, seed: int, steps: int = VAE_STEPS, log=print) -> None:
    """Reconstruction (MSE) plus a small KL term. Most steps see 32-pixel crops
    (4x cheaper); the last `VAE_FULL_SHARE` see whole pictures, so the norms and
    the attention settle on the size the toy is used at."""
    rng = random.Random(seed + 1)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=VAE_LR, weight_decay=0.0)
    vae.train()
    full_from = int(steps * (1 - VAE_FULL_SHARE))
    for step in range(steps):
        _set_lr(optimizer, _lr(step, steps, VAE_LR))
        full = step >= full_from
        pixels = _vae_batch(rng, VAE_BATCH // 2 if full else VAE_BATCH, 64 if full else 32)
        # The mean, not a sample: a deterministic coder learns these flat
        # pictures much faster; the KL term only keeps the latents small.
        posterior = vae.encode(pixels).latent_dist
        loss = torch.nn.functional.mse_loss(vae.decode(posterior.mean).sample, pixels)
        optimizer.zero_grad(set_to_none=True)
        (loss + KL_WEIGHT * posterior.kl().mean()).backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps}: loss {loss.item():.5f}")
    vae.eval()


def tune_vae_colours(vae, seed: int, steps: int = VAE_COLOUR_STEPS, log=print) -> None:
    """Whole pictures, with the error of their 8 x 8 block means weighted up:
    after `train_vae` the shapes are right but the colours drift (yellow
    decodes pink), as the norms make a colour's strength hard to carry."""
    rng = random.Random(seed + 6)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=VAE_LR / 2, weight_decay=0.0)
    vae.train()
    for step in range(steps):
        _set_lr(optimizer, _lr(step, steps, VAE_LR / 2))
        pixels = _vae_batch(rng, VAE_BATCH // 2, 64)
        decoded = vae.decode(vae.encode(pixels).latent_dist.mean).sample
        blocks = torch.nn.functional.avg_pool2d
        loss = torch.nn.functional.mse_loss(decoded, pixels)
        colour = torch.nn.functional.mse_loss(blocks(decoded, 8), blocks(pixels, 8))
        optimizer.zero_grad(set_to_none=True)
        (loss + COLOUR_WEIGHT * colour).backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae colour step {step}/{steps}: loss {loss.item():.5f}, "
                f"block colours {colour.item():.5f}")
    vae.eval()


@torch.no_grad()
def scale_latents(vae, seed: int, count: int = 64) -> float:
    """Rescale the VAE's latents (encoder mean and std by k, decoder input by
    1/k: the same pictures) so that SD1.5's scaling factor makes them unit
    variance, as the trainer and samplers expect. Returns k."""
    from trainer.demo_toy_data import vae_image

    rng = random.Random(seed + 3)
    mean = vae.encode(_pixels([vae_image(rng) for _ in range(count)])).latent_dist.mean
    k = 1.0 / (mean.std().item() * vae.config.scaling_factor)
    channels = vae.config.latent_channels
    vae.quant_conv.weight[:channels] *= k
    vae.quant_conv.bias[:channels] *= k
    vae.quant_conv.bias[channels:] += 2 * math.log(k)  # log variance: std times k
    vae.post_quant_conv.weight /= k
    return k


@torch.no_grad()
def base_latents(vae, seed: int, per_caption: int = UNET_IMAGES_PER_CAPTION):
    """(latents, caption index) of the U-Net's training pictures."""
    from trainer.demo_toy_data import BASE_COLOURS, BASE_SHAPES, base_image

    rng, latents, labels = random.Random(seed + 4), [], []
    pairs = [(c, s) for s in BASE_SHAPES for c in BASE_COLOURS]
    for index, (colour, shape) in enumerate(pairs):
        pixels = _pixels([base_image(rng, colour, shape) for _ in range(per_caption)])
        latents.append(vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor)
        labels += [index] * per_caption
    return torch.cat(latents), torch.tensor(labels)


@torch.no_grad()
def caption_embeddings(components: dict) -> torch.Tensor:
    """The base captions' conditioning, then the empty caption's (last row)."""
    from trainer.demo_toy_data import base_captions
    from trainer.text_encoding import encode_captions

    return encode_captions(components["text_encoder"], components["tokenizer"],
                           [*base_captions(), ""])


def train_unet(components: dict, latents, labels, seed: int, steps: int = UNET_STEPS,
               batch: int = UNET_BATCH, log=print) -> None:
    from diffusers import DDPMScheduler

    from trainer.sd15_config import load_sd15_config

    unet = components["unet"]
    schedule = DDPMScheduler.from_config(load_sd15_config("scheduler"))
    embeddings = caption_embeddings(components)
    empty = embeddings.shape[0] - 1
    snr = schedule.alphas_cumprod / (1 - schedule.alphas_cumprod)
    weights = torch.clamp(snr, max=MIN_SNR_GAMMA) / snr  # min-SNR, epsilon prediction
    generator = torch.Generator().manual_seed(seed + 5)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=UNET_LR, weight_decay=1e-2)
    unet.train()
    for step in range(steps):
        _set_lr(optimizer, _lr(step, steps, UNET_LR))
        index = torch.randint(0, latents.shape[0], (batch,), generator=generator)
        label = labels[index].clone()
        label[torch.rand(batch, generator=generator) < EMPTY_CAPTION_RATE] = empty
        t = torch.randint(0, schedule.config.num_train_timesteps, (batch,), generator=generator)
        noise = torch.randn(latents[index].shape, generator=generator)
        noisy = schedule.add_noise(latents[index], noise, t)
        predicted = unet(noisy, t, embeddings[label]).sample
        loss = (weights[t] * (predicted - noise).square().mean(dim=(1, 2, 3))).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"unet step {step}/{steps}: loss {loss.item():.5f}")
    unet.eval()


def pretrain(seed: int = 0, vae_steps: int = VAE_STEPS, unet_steps: int = UNET_STEPS,
             per_caption: int = UNET_IMAGES_PER_CAPTION, colour_steps: int = VAE_COLOUR_STEPS,
             log=print) -> dict:
    """The trained components (text encoder untouched)."""
    from trainer.demo_toy import build_toy_components

    components = build_toy_components(seed)
    for part in ("unet", "vae", "text_encoder"):
        components[part].requires_grad_(part != "text_encoder")
    started = time.monotonic()
    train_vae(components["vae"], seed, vae_steps, log=log)
    scale_latents(components["vae"], seed)  # the same pictures; Adam then sees unit latents
    tune_vae_colours(components["vae"], seed, colour_steps, log=log)
    k = scale_latents(components["vae"], seed)
    log(f"vae done in {time.monotonic() - started:.0f} s; latent scale {k:.3f}")
    latents, labels = base_latents(components["vae"], seed, per_caption)
    started = time.monotonic()
    train_unet(components, latents, labels, seed, unet_steps, log=log)
    log(f"unet done in {time.monotonic() - started:.0f} s")
    for part in ("unet", "vae"):
        components[part].requires_grad_(False)
    return components


def main(argv: list[str] | None = None) -> int:
    from trainer.demo_toy import save_asset

    parser = argparse.ArgumentParser(prog="python -m trainer.demo_toy_pretrain",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the asset to write (.safetensors)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=VAE_STEPS)
    parser.add_argument("--vae-colour-steps", type=int, default=VAE_COLOUR_STEPS)
    parser.add_argument("--unet-steps", type=int, default=UNET_STEPS)
    args = parser.parse_args(argv)
    # One thread: these small batches ran 15x slower on two threads of a
    # shared 2-core VM, and the thread count is part of what makes it repeatable.
    torch.set_num_threads(1)
    components = pretrain(args.seed, args.vae_steps, args.unet_steps,
                          colour_steps=args.vae_colour_steps,
                          log=lambda text: print(text, file=sys.stderr, flush=True))
    size = save_asset(components, Path(args.out), args.seed,
                      {"vae_steps": args.vae_steps, "vae_colour_steps": args.vae_colour_steps,
                       "unet_steps": args.unet_steps})
    print(f"wrote {args.out} ({size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
