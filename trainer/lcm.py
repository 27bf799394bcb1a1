"""LCM-LoRA distillation (docs/FORMATS.md "LCM-LoRA") as short pure functions.

Latent Consistency Models: Luo et al. 2023, arXiv:2310.04378 ("LCM"), their
Algorithm 1 (latent consistency distillation); LCM-LoRA: Luo et al. 2023,
arXiv:2311.05556 ("LCM-LoRA"), which trains only a LoRA on the student and
drops the EMA target network. The arithmetic follows diffusers'
`examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py`.

One U-Net serves as both models: the teacher is the U-Net with its adapters
disabled, the student the same U-Net with them enabled, so distillation
needs one U-Net in memory, not two.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
import torch.nn.functional as F

LOSS_KINDS = ("huber", "l2")


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(batch,) -> (batch, 1, 1, 1...) to broadcast over a latent batch."""
    return values.reshape(values.shape[0], *([1] * (like.dim() - 1))).to(like)


def ddim_timesteps(num_train: int = 1000, num_ddim: int = 50) -> torch.Tensor:
    """The DDIM solver's grid t_n = (n + 1) k - 1 with skipping step
    k = num_train // num_ddim: {19, 39, ..., 999} for SD (LCM section 4.3,
    "skipping-step" k = 20)."""
    skip = num_train // num_ddim
    return torch.arange(1, num_ddim + 1) * skip - 1


def sample_start_indices(batch: int, num_ddim: int, generator: torch.Generator) -> torch.Tensor:
    """One grid index n per sample, uniform over the solver's timesteps."""
    return torch.randint(0, num_ddim, (batch,), generator=generator)


def previous_timesteps(t_start: torch.Tensor, skip: int) -> torch.Tensor:
    """t_prev = t_start - k, clamped at 0: the first grid point (19) steps to 0."""
    return torch.clamp(t_start - skip, min=0)


def boundary_scalings(
    t: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) of the consistency parameterisation
    f(x, t) = c_skip(t) x + c_out(t) x0(x, t) (LCM section 4.1, after Song et
    al. 2023, arXiv:2303.01469), in the form of LCM's released code and
    diffusers' `LCMScheduler` (timestep scaled by 10):
    c_skip = sigma_data^2 / ((s t)^2 + sigma_data^2),
    c_out = s t / sqrt((s t)^2 + sigma_data^2).
    At t = 0 c_skip = 1 and c_out = 0: f(x, 0) = x, the boundary condition."""
    scaled = timestep_scaling * t.double()
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2).sqrt()
    return c_skip.float(), c_out.float()


def _alpha_sigma(alphas_cumprod, timesteps, like) -> tuple[torch.Tensor, torch.Tensor]:
    alpha_bar = _per_sample(alphas_cumprod.to(like.device)[timesteps], like)
    return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()


def predicted_x0(
    model_output: torch.Tensor,
    timesteps: torch.Tensor,
    sample: torch.Tensor,
    prediction_type: str,
    alphas_cumprod: torch.Tensor,
) -> torch.Tensor:
    """The clean latents a U-Net output implies, from x_t = alpha x0 + sigma eps
    (DDPM, Ho et al. 2020, arXiv:2006.11239 eq. 4; v = alpha eps - sigma x0,
    Salimans & Ho 2022, arXiv:2202.00512)."""
    alpha, sigma = _alpha_sigma(alphas_cumprod, timesteps, sample)
    if prediction_type == "epsilon":
        return (sample - sigma * model_output) / alpha
    if prediction_type == "v_prediction":
        return alpha * sample - sigma * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"unsupported prediction type {prediction_type!r}")


def predicted_eps(
    model_output: torch.Tensor,
    timesteps: torch.Tensor,
    sample: torch.Tensor,
    prediction_type: str,
    alphas_cumprod: torch.Tensor,
) -> torch.Tensor:
    """The noise a U-Net output implies (same relations as `predicted_x0`)."""
    alpha, sigma = _alpha_sigma(alphas_cumprod, timesteps, sample)
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return alpha * model_output + sigma * sample
    if prediction_type == "sample":
        return (sample - alpha * model_output) / sigma
    raise ValueError(f"unsupported prediction type {prediction_type!r}")


def ddim_step(
    x0: torch.Tensor, eps: torch.Tensor, t_prev: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """Deterministic DDIM update to t_prev (Song et al. 2020, arXiv:2010.02502
    eq. 12 with sigma = 0): x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps,
    the one-step ODE solver Psi of LCM section 4.1."""
    alpha_prev, sigma_prev = _alpha_sigma(alphas_cumprod, t_prev, x0)
    return alpha_prev * x0 + sigma_prev * eps


def sample_guidance(
    batch: int, w_min: float, w_max: float, generator: torch.Generator
) -> torch.Tensor:
    """Per-sample guidance w ~ U[w_min, w_max] (LCM Algorithm 1; [5, 15] in the
    LCM-LoRA training recipe); w_min == w_max gives a fixed scale."""
    return w_min + (w_max - w_min) * torch.rand(batch, generator=generator)


def cfg(cond: torch.Tensor, uncond: torch.Tensor, w: torch.Tensor | float) -> torch.Tensor:
    """Classifier-free guidance in the LCM convention (LCM section 4.2):
    cond + w (cond - uncond), so w = 0 is the conditional prediction (the
    usual "guidance scale" of pipelines is w + 1). `w` is a number or one
    value per sample."""
    if isinstance(w, torch.Tensor):
        w = _per_sample(w, cond)
    return cond + w * (cond - uncond)


def lcm_loss(
    pred: torch.Tensor, target: torch.Tensor, kind: str = "huber", c: float = 0.001
) -> torch.Tensor:
    """Pseudo-Huber mean(sqrt((p - y)^2 + c^2) - c) (Song & Dhariwal 2023,
    arXiv:2310.14189, as used for LCM-LoRA), or l2 = mean((p - y)^2)."""
    diff = pred.float() - target.float()
    if kind == "huber":
        return torch.mean(torch.sqrt(diff.square() + c * c) - c)
    if kind == "l2":
        return F.mse_loss(pred.float(), target.float())
    raise ValueError(f"unknown LCM loss {kind!r}; choose from {', '.join(LOSS_KINDS)}")


def consistency_output(
    sample: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, timestep_scaling: float = 10.0
) -> torch.Tensor:
    """f(x, t) = c_skip(t) x + c_out(t) x0 (see `boundary_scalings`)."""
    c_skip, c_out = boundary_scalings(t, timestep_scaling=timestep_scaling)
    return _per_sample(c_skip, sample) * sample + _per_sample(c_out, sample) * x0


def distillation_loss(
    unet,
    network,
    batch_latents: torch.Tensor,
    text_embeddings: torch.Tensor,
    uncond_embedding: torch.Tensor,
    noise_scheduler,
    generator: torch.Generator,
    w_min: float = 5.0,
    w_max: float = 15.0,
    loss_kind: str = "huber",
    huber_c: float = 0.001,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    *,
    num_ddim: int = 50,
    target_weights: Callable[[], AbstractContextManager] = nullcontext,
) -> torch.Tensor:
    """One LCM-LoRA distillation step's loss (LCM Algorithm 1 with the LoRA
    student as its own no-grad target, as in the LCM-LoRA report, unless
    `target_weights` swaps other weights in for the target).

    `network` must be attached to `unet`; its adapters are switched off for
    the teacher and back on afterwards. The random draws (grid index, noise,
    guidance) come from `generator` (on the CPU) in that order.
    `uncond_embedding` is the empty prompt's embedding, (1 or batch, 77, dim).
    Like the diffusers example for SD1.5, the U-Net gets plain text
    embeddings, no guidance embedding. `target_weights` is entered around the
    target's forward pass: a context that swaps in other adapter weights (an
    EMA copy, as in LCM's Algorithm 1) changes which network gives the target.
    """
    latents = batch_latents.float()
    batch, device = latents.shape[0], latents.device
    config = noise_scheduler.config
    prediction_type = config.prediction_type
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)

    def x0_of(output, t, sample):
        return predicted_x0(output.float(), t, sample, prediction_type, alphas_cumprod)

    # 1. Grid index n per sample: t_start = 20n + 19, t_prev = t_start - 20.
    grid = ddim_timesteps(config.num_train_timesteps, num_ddim)
    t_start = grid[sample_start_indices(batch, num_ddim, generator)].to(device)
    t_prev = previous_timesteps(t_start, config.num_train_timesteps // num_ddim)

    # 2. z = the latents noised to t_start; a guidance scale per sample.
    noise = torch.randn(latents.shape, generator=generator).to(device)
    z = noise_scheduler.add_noise(latents, noise, t_start)
    w = sample_guidance(batch, w_min, w_max, generator).to(device)

    # 3. Student at t_start: adapters on, with grad.
    with autocast():
        student_out = unet(z, t_start, text_embeddings).sample
    prediction = consistency_output(z, x0_of(student_out, t_start, z), t_start)

    with torch.no_grad():
        # 4. Teacher (adapters off): cond and uncond in one batch, CFG on x0
        #    and eps, one DDIM step from t_start to t_prev.
        uncond = uncond_embedding.expand(batch, *uncond_embedding.shape[1:])
        network.set_enabled(False)
        try:
            with autocast():
                teacher_out = unet(
                    torch.cat([z, z]), torch.cat([t_start, t_start]),
                    torch.cat([text_embeddings, uncond.to(text_embeddings)]),
                ).sample.float()  # fmt: skip
        finally:
            network.set_enabled(True)
        cond_out, uncond_out = teacher_out.chunk(2)

        def eps_of(output):
            return predicted_eps(output, t_start, z, prediction_type, alphas_cumprod)

        x0 = cfg(x0_of(cond_out, t_start, z), x0_of(uncond_out, t_start, z), w)
        eps = cfg(eps_of(cond_out), eps_of(uncond_out), w)
        x_prev = ddim_step(x0, eps, t_prev, alphas_cumprod)

        # 5. Target: the student at t_prev, without grad (or its EMA copy).
        with autocast(), target_weights():
            target_out = unet(x_prev, t_prev, text_embeddings).sample
        target = consistency_output(x_prev, x0_of(target_out, t_prev, x_prev), t_prev)

    return lcm_loss(prediction, target, loss_kind, huber_c)


class EmaTarget:
    """LCM's target network (Algorithm 1: theta- <- mu theta- + (1 - mu) theta)
    as an EMA copy of the adapter weights, swapped in for the target's pass
    (`distillation_loss(..., target_weights=ema.swapped_in)`). LCM-LoRA drops
    it; on our evidence benchmark decays of 0.95 and 0.99 lowered the 4-step
    error by a quarter and more (BENCHMARKS.md)."""

    PREFIX = "lcm_target_ema."  # its tensors' keys in a training state

    def __init__(self, named_params: list[tuple[str, torch.Tensor]], decay: float):
        self.names = [name for name, _ in named_params]
        self.params = [param for _, param in named_params]
        self.decay = decay
        self.shadow = [param.detach().clone() for param in self.params]

    @classmethod
    def of_network(cls, network: torch.nn.Module, decay: float) -> EmaTarget:
        """The EMA of a network's trainable parameters."""
        trainable = [(name, p) for name, p in network.named_parameters() if p.requires_grad]
        return cls(trainable, decay)

    @torch.no_grad()
    def update(self) -> None:
        for shadow, param in zip(self.shadow, self.params, strict=True):
            shadow.lerp_(param, 1 - self.decay)

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        # Swap storage, not values: an in-place copy would invalidate the
        # tensors the student's forward saved for its backward pass.
        live = [param.data for param in self.params]
        for param, shadow in zip(self.params, self.shadow, strict=True):
            param.data = shadow
        try:
            yield
        finally:
            for param, value in zip(self.params, live, strict=True):
                param.data = value

    def state_dict(self) -> dict[str, torch.Tensor]:
        pairs = zip(self.names, self.shadow, strict=True)
        return {self.PREFIX + name: shadow for name, shadow in pairs}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        missing = [name for name in self.names if self.PREFIX + name not in tensors]
        if missing:
            raise KeyError(f"no EMA target weights for {missing[0]} (and {len(missing) - 1} more)")
        with torch.no_grad():
            for name, shadow in zip(self.names, self.shadow, strict=True):
                shadow.copy_(tensors[self.PREFIX + name])
