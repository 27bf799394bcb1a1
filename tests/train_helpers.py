"""Measuring what a trained adapter does, independently of the training loop."""

from __future__ import annotations

import contextlib
import copy

import torch

from networks.export import load_network
from trainer.text_encoding import encode_captions


@torch.no_grad()
def fixed_eval_loss(sd, dataset_root, resolution: int = 64, seed: int = 0) -> float:
    """Denoising MSE over every image at fixed noise and timesteps."""
    from PIL import Image

    images = sorted(p for p in dataset_root.rglob("*.png"))
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    for path in images:
        image = Image.open(path).convert("RGB").resize((resolution, resolution))
        pixels = torch.tensor(list(image.getdata()), dtype=torch.float32)
        pixels = pixels.view(resolution, resolution, 3).permute(2, 0, 1)[None] / 127.5 - 1
        latents = sd.vae.encode(pixels).latent_dist.mode() * sd.vae.config.scaling_factor
        caption = path.with_suffix(".txt").read_text().strip()
        text = encode_captions(sd.text_encoder, sd.tokenizer, [caption])
        for _ in range(4):
            noise = torch.randn(latents.shape, generator=generator)
            t = torch.randint(0, 1000, (1,), generator=generator)
            noisy = sd.noise_scheduler.add_noise(latents, noise, t)
            total += float((sd.unet(noisy, t, text).sample - noise).square().mean())
    return total / (4 * len(images))


@contextlib.contextmanager
def with_adapter(sd, file):
    """A copy of `sd` with the adapter file attached."""
    adapted = copy.deepcopy(sd)
    network = load_network(file, adapted.unet, adapted.text_encoder).attach()
    network.eval()
    try:
        yield adapted
    finally:
        network.detach()
