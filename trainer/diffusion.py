"""The denoising objective, as short pure functions (after diffusers'
`train_text_to_image_lora.py`): noise, timesteps, target, loss weights."""

from __future__ import annotations

import torch


def make_noise(
    shape: torch.Size, generator: torch.Generator, noise_offset: float = 0.0
) -> torch.Tensor:
    """Gaussian noise, plus an optional per-channel offset that lets the model
    learn very dark and very bright images (Guttenberg, "Diffusion with Offset
    Noise", crosslabs.org 2023)."""
    noise = torch.randn(shape, generator=generator)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(shape[0], shape[1], 1, 1, generator=generator)
    return noise


def sample_timesteps(
    batch: int, num_train_timesteps: int, generator: torch.Generator
) -> torch.Tensor:
    return torch.randint(0, num_train_timesteps, (batch,), generator=generator)


def compute_target(noise_scheduler, latents, noise, timesteps) -> torch.Tensor:
    """What the U-Net must predict: the noise (epsilon) or the velocity
    v = alpha_t * noise - sigma_t * x0 (Salimans & Ho 2022, arXiv:2202.00512)."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction type {prediction_type!r}")


def compute_snr(noise_scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR(t) = alpha_bar_t / (1 - alpha_bar_t)."""
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alphas_cumprod / (1 - alphas_cumprod)


def loss_weights(noise_scheduler, timesteps: torch.Tensor, min_snr_gamma: float) -> torch.Tensor:
    """Per-sample weights of Min-SNR-gamma (Hang et al. 2023, arXiv:2303.09556,
    eq. 6): min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v.
    All ones when gamma is 0 (off)."""
    if not min_snr_gamma:
        return torch.ones(len(timesteps))
    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.clamp(snr, max=min_snr_gamma)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def per_sample_mse(
    prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error per sample; with `mask` (B x 1 x h x w in [0, 1], at the
    latent grid or larger) each latent pixel's error is weighted by it first.

    As kohya's `apply_masked_loss` (sd-scripts library/custom_train_functions.py):
    a larger mask is averaged down ("area") to the latent grid, and the weighted
    error is averaged over *all* pixels, not over the mask's sum. A half-masked
    image therefore weighs about half as much as a full one, and a sample that is
    mostly masked out cannot blow up its few remaining pixels' gradients.
    """
    error = (prediction.float() - target.float()).square()
    if mask is not None:
        error = error * masked_weights(mask, tuple(error.shape[-2:])).to(error.device)
    return error.mean(dim=tuple(range(1, prediction.dim())))


def masked_weights(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """B x 1 x h x w float weights on the latent grid `size` (h, w)."""
    from datasets_tools.masks import to_grid

    return to_grid(mask.float(), size)
