"""Synthetic data, tiny U-Net and samplers for `bench.lcm_evidence`.

Images of a red, green or blue circle, square or triangle on a plain grey
background are used directly as diffusion "latents": 4 channels (RGB and
luminance), normalised to zero mean and unit variance, so no VAE is needed
and samples can be looked at as they are. The class (colour x shape, 9 in
all) conditions the U-Net through two fixed random 32-wide "text" tokens,
one for the colour and one for the shape; the null embedding (zeros) is the
unconditional prompt, so classifier-free guidance means something.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from trainer.lcm import cfg, consistency_output, ddim_step, predicted_x0

NUM_CLASSES = 9  # colour = class // 3 (red, green, blue), shape = class % 3
SHAPES = ("circle", "square", "triangle")
TOKEN_DIM = 32
BACKGROUND = -0.6
COLOURS = torch.tensor([[1.0, -0.8, -0.8], [-0.8, 1.0, -0.8], [-0.8, -0.8, 1.0]])


def raw_images(classes: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 4, size, size) in [-1, 1]: one shape of random position and size."""
    n = len(classes)
    colour, shape = classes // 3, classes % 3
    centre = size * (0.3 + 0.4 * torch.rand(n, 2, generator=generator))
    radius = size * (0.18 + 0.1 * torch.rand(n, generator=generator))
    grid = torch.arange(size) + 0.5
    dy = grid[None, :, None] - centre[:, 1, None, None]
    dx = grid[None, None, :] - centre[:, 0, None, None]
    r = radius[:, None, None]
    masks = torch.stack([
        dx.square() + dy.square() <= r.square(),
        torch.maximum(dx.abs(), dy.abs()) <= 0.85 * r,
        (dy <= 0.8 * r) & (dx.abs() <= 0.6 * (dy + r)),  # apex up
    ])  # fmt: skip
    mask = masks[shape, torch.arange(n)][:, None]
    rgb = torch.where(mask, COLOURS[colour][:, :, None, None], torch.tensor(BACKGROUND))
    return torch.cat([rgb, rgb.mean(1, keepdim=True)], 1)


_STATS: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def latent_stats(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of the raw images (fixed seed, 4096 samples)."""
    if size not in _STATS:
        g = torch.Generator().manual_seed(1234)
        x = raw_images(torch.randint(0, NUM_CLASSES, (4096,), generator=g), size, g)
        _STATS[size] = (x.mean((0, 2, 3), keepdim=True), x.std((0, 2, 3), keepdim=True))
    return _STATS[size]


def make_latents(classes: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    mean, std = latent_stats(size)
    return (raw_images(classes, size, generator) - mean) / std


def to_rgb(latents: torch.Tensor) -> torch.Tensor:
    """Latents back to RGB in [0, 1]."""
    mean, std = latent_stats(latents.shape[-1])
    return ((latents * std + mean)[:, :3].clamp(-1, 1) + 1) / 2


def class_embeddings(classes: torch.Tensor) -> torch.Tensor:
    """(n, 2, 32): a fixed random token for the colour and one for the shape."""
    tables = torch.randn(2, 3, TOKEN_DIM, generator=torch.Generator().manual_seed(7))
    return torch.stack([tables[0][classes // 3], tables[1][classes % 3]], 1)


def null_embedding() -> torch.Tensor:
    return torch.zeros(1, 2, TOKEN_DIM)


def tiny_unet(size: int, seed: int = 0):
    """A 2-level SD-style U-Net, widths (16, 32), cross-attention at the 8x8
    level and in the middle block (so LoRA/LoCon targets exist). Attention at
    the full resolution made a CPU training step about 10x slower."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TOKEN_DIM, attention_head_dim=8, norm_num_groups=8,
    )  # fmt: skip


# --- samplers ------------------------------------------------------------
@torch.no_grad()
def ddim_sample(
    unet, scheduler_config, noise, cond, uncond, w: float, steps: int, spacing: str = "trailing",
    path: dict | None = None,
):  # fmt: skip
    """Deterministic DDIM (default trailing timesteps: the first step is t = 999)
    with CFG in the LCM convention: eps = cond + w (cond - uncond).
    `path`, a dict keyed by timesteps, receives the sample on its way at
    those timesteps."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(scheduler_config, timestep_spacing=spacing)
    scheduler.set_timesteps(steps)
    x, uncond = noise.clone(), uncond.expand_as(cond)
    for t in scheduler.timesteps:
        if path is not None and int(t) in path:
            path[int(t)] = x
        out = unet(torch.cat([x, x]), t, torch.cat([cond, uncond])).sample
        eps_cond, eps_uncond = out.chunk(2)
        x = scheduler.step(cfg(eps_cond, eps_uncond, w), t, x, eta=0.0).prev_sample
    return x


@torch.no_grad()
def consistency_on_path(unet, alphas_cumprod, path: dict, cond) -> dict:
    """f(x_t, t) for samples x_t on the reference's own ODE path: what a
    one-jump consistency map gives from each of them."""
    results = {}
    for t, x in path.items():
        t_batch = torch.full((len(x),), t, dtype=torch.long, device=x.device)
        x0 = predicted_x0(unet(x, t_batch, cond).sample, t_batch, x, "epsilon", alphas_cumprod)
        results[t] = consistency_output(x, x0, t_batch)
    return results


@torch.no_grad()
def lcm_sample_diffusers(unet, scheduler_config, noise, cond, steps: int, seed: int):
    """diffusers' `LCMScheduler` multistep sampling, no CFG."""
    from diffusers import LCMScheduler

    scheduler = LCMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    x, denoised = noise.clone(), None
    for t in scheduler.timesteps:
        out = unet(x, t, cond).sample
        x, denoised = scheduler.step(out, t, x, generator=generator, return_dict=False)
    return denoised, [int(t) for t in scheduler.timesteps]


@torch.no_grad()
def lcm_sample_ours(
    unet, alphas_cumprod, noise, cond, timesteps, seed: int, deterministic: bool = False
):
    """The same multistep consistency sampling written with `trainer.lcm`:
    f(x, t) = c_skip x + c_out x0, then re-noise to the next timestep with a
    fresh draw (drawn in the order `LCMScheduler` draws it).

    `deterministic` re-noises with the model's own noise prediction instead
    (a DDIM step from the consistency output; TCD's gamma = 0, Zheng et al.
    2024, arXiv:2402.19159): the new point lies on the line from the current
    sample to its predicted clean sample, so the sample stays tied to its
    starting noise, as the 50-step reference is."""
    generator = torch.Generator().manual_seed(seed)
    x, n = noise.clone(), len(noise)
    for i, t in enumerate(timesteps):
        t_batch = torch.full((n,), t, dtype=torch.long, device=x.device)
        eps = unet(x, t_batch, cond).sample
        x0 = predicted_x0(eps, t_batch, x, "epsilon", alphas_cumprod)
        denoised = consistency_output(x, x0, t_batch)
        if i + 1 < len(timesteps):
            renoise = eps if deterministic else torch.randn(x.shape, generator=generator).to(x)
            t_next = torch.full((n,), timesteps[i + 1], device=x.device)
            x = ddim_step(denoised, renoise, t_next, alphas_cumprod)
    return denoised


def save_grid(rows: list[torch.Tensor], path, scale: int = 4) -> None:
    """One row of images per tensor, 2 px gaps, nearest-neighbour upscaled."""
    rows = [to_rgb(r) for r in rows]
    n, size = rows[0].shape[0], rows[0].shape[-1]
    cell = size + 2
    canvas = torch.ones(3, len(rows) * cell, n * cell)
    for i, row in enumerate(rows):
        for j in range(n):
            top, left = i * cell + 1, j * cell + 1
            canvas[:, top : top + size, left : left + size] = row[j]
    array = (canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    image = Image.fromarray(array)
    image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    image.save(path, optimize=True)
