"""LCM-LoRA distillation math (trainer/lcm.py): each formula on hand values or
against diffusers, then one distillation step on the demo model."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from diffusers import DDPMScheduler, LCMScheduler

from networks.network import AdapterNetwork, NetworkSpec
from trainer import lcm
from trainer.sd15_config import load_sd15_config
from trainer.text_encoding import encode_captions


@pytest.fixture(scope="module")
def scheduler():
    return DDPMScheduler.from_config(load_sd15_config("scheduler"))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_ddim_timesteps_are_19_to_999_every_20():
    grid = lcm.ddim_timesteps(1000, 50)
    assert grid.tolist() == list(range(19, 1000, 20))
    assert lcm.previous_timesteps(torch.tensor([19, 39, 999]), 20).tolist() == [0, 19, 979]


def test_start_indices_cover_the_grid_and_repeat_with_the_seed():
    draw = lcm.sample_start_indices(4000, 50, torch.Generator().manual_seed(0))
    assert draw.min() == 0 and draw.max() == 49
    again = lcm.sample_start_indices(4000, 50, torch.Generator().manual_seed(0))
    assert torch.equal(draw, again)


def test_boundary_scalings():
    c_skip, c_out = lcm.boundary_scalings(torch.tensor([0, 1, 999]))
    # t = 0: f(x, 0) = x, the consistency boundary condition.
    assert c_skip[0] == 1 and c_out[0] == 0
    assert c_skip[1] == pytest.approx(0.25 / 100.25) and c_out[1] == pytest.approx(10 / 100.25**0.5)
    assert c_skip[2] < 1e-8 and c_out[2] == pytest.approx(1.0, abs=1e-8)
    # Same numbers as diffusers' LCMScheduler.
    reference = LCMScheduler(timestep_scaling=10.0)
    for t in (0, 19, 259, 999):
        expected = reference.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
        actual = lcm.boundary_scalings(torch.tensor([t]))
        assert [float(a) for a in actual] == pytest.approx([float(e) for e in expected])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_x0_and_eps_recovered_from_the_model_output(prediction_type, scheduler):
    generator = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 2, 4, 4, 4, generator=generator)
    t = torch.tensor([19, 739])
    z = scheduler.add_noise(x0, eps, t)
    output = {
        "epsilon": eps,
        "v_prediction": scheduler.get_velocity(x0, eps, t),
        "sample": x0,
    }[prediction_type]
    ac = scheduler.alphas_cumprod
    torch.testing.assert_close(lcm.predicted_x0(output, t, z, prediction_type, ac), x0)
    torch.testing.assert_close(lcm.predicted_eps(output, t, z, prediction_type, ac), eps)


def test_ddim_step_lands_on_the_forward_process(scheduler):
    """With the exact x0 and eps, a DDIM step is x_prev = add_noise(x0, eps, t_prev)."""
    generator = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 3, 4, 8, 8, generator=generator)
    t_prev = lcm.previous_timesteps(torch.tensor([19, 519, 999]), 20)
    expected = scheduler.add_noise(x0, eps, t_prev)
    torch.testing.assert_close(lcm.ddim_step(x0, eps, t_prev, scheduler.alphas_cumprod), expected)


def test_guidance_draws_and_cfg_arithmetic():
    w = lcm.sample_guidance(1000, 5.0, 15.0, torch.Generator().manual_seed(0))
    assert 5.0 <= w.min() and w.max() <= 15.0 and 9.5 < w.mean() < 10.5
    assert lcm.sample_guidance(3, 8.0, 8.0, torch.Generator()).tolist() == [8.0] * 3
    cond, uncond = torch.full((2, 1, 2, 2), 2.0), torch.full((2, 1, 2, 2), 1.0)
    assert torch.equal(lcm.cfg(cond, uncond, 3.0), torch.full((2, 1, 2, 2), 5.0))
    # LCM convention: w = 0 is the conditional prediction (no +1); w per sample.
    per_sample = lcm.cfg(cond, uncond, torch.tensor([0.0, 1.0]))
    assert per_sample[0].unique().tolist() == [2.0] and per_sample[1].unique().tolist() == [3.0]


def test_loss_values_by_hand():
    pred, target = torch.tensor([0.0, 1.0, 3.0]), torch.tensor([0.0, 0.0, -1.0])
    huber = (0.0 + (math.sqrt(1.25) - 0.5) + (math.sqrt(16.25) - 0.5)) / 3
    assert float(lcm.lcm_loss(pred, target, "huber", c=0.5)) == pytest.approx(huber)
    assert float(lcm.lcm_loss(pred, pred, "huber")) == 0.0
    # The LCM-LoRA default c = 0.001: close to the mean absolute error.
    default = ((math.sqrt(1 + 1e-6) - 1e-3) + (math.sqrt(16 + 1e-6) - 1e-3)) / 3
    assert float(lcm.lcm_loss(pred, target)) == pytest.approx(default)
    assert float(lcm.lcm_loss(pred, target, "l2")) == pytest.approx(17 / 3)
    with pytest.raises(ValueError, match="unknown LCM loss"):
        lcm.lcm_loss(pred, target, "l1")


@pytest.fixture
def student(demo_sd):
    """A frozen copy of the demo U-Net with a fresh LoCon attached."""
    unet = copy.deepcopy(demo_sd.unet).requires_grad_(False)
    spec = NetworkSpec("locon", rank=4, alpha=4, conv_rank=4, conv_alpha=4)
    network = AdapterNetwork.create(spec, unet, None).attach()
    return unet, network


@pytest.fixture(scope="module")
def batch(demo_sd):
    with torch.no_grad():
        text = encode_captions(demo_sd.text_encoder, demo_sd.tokenizer, ["a red circle"] * 2)
        uncond = encode_captions(demo_sd.text_encoder, demo_sd.tokenizer, [""])
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    return latents, text, uncond


def loss_for(student, batch, scheduler, seed=1):
    unet, network = student
    latents, text, uncond = batch
    generator = torch.Generator().manual_seed(seed)
    return lcm.distillation_loss(
        unet, network, latents, text, uncond, scheduler, generator, 5.0, 15.0, "huber", 0.001
    )


def test_distillation_loss_trains_only_the_adapter(student, batch, demo_sd):
    unet, network = student
    calls = []
    unet.register_forward_pre_hook(
        lambda module, args: calls.append((network.adapters[0].enabled, torch.is_grad_enabled()))
    )
    loss = loss_for(student, batch, demo_sd.noise_scheduler)
    # Student (adapters on, grad), teacher (off, no grad), target (on, no grad).
    assert calls == [(True, True), (False, False), (True, False)]
    assert network.adapters[0].enabled
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None for p in unet.parameters())
    grads = [p.grad for p in network.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_distillation_is_repeatable_and_a_few_adamw_steps_reduce_the_loss(student, batch, demo_sd):
    unet, network = student
    with torch.no_grad():
        first, again = (float(loss_for(student, batch, demo_sd.noise_scheduler)) for _ in range(2))
    assert first == again
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        # The same draws every step, so the loss changes only with the adapter.
        loss = loss_for(student, batch, demo_sd.noise_scheduler)
        losses.append(float(loss.detach()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        losses.append(float(loss_for(student, batch, demo_sd.noise_scheduler)))
    assert losses[-1] < 0.9 * losses[0], losses


def test_ema_target_averages_swaps_in_and_leaves_the_student_gradient_alone():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    ema = lcm.EmaTarget([("w", w)], decay=0.9)
    with torch.no_grad():
        w.copy_(torch.tensor([3.0, 4.0]))
    ema.update()
    torch.testing.assert_close(ema.shadow[0], torch.tensor([1.2, 2.2]))
    x = torch.tensor([5.0, 7.0])
    student = (w * x).sum()  # saves w for backward
    with torch.no_grad(), ema.swapped_in():
        target = (w * x).sum()
    torch.testing.assert_close(target, torch.tensor(1.2 * 5 + 2.2 * 7))
    student.backward()
    torch.testing.assert_close(w.detach(), torch.tensor([3.0, 4.0]))
    torch.testing.assert_close(w.grad, x)
    assert set(ema.state_dict()) == {"lcm_target_ema.w"}
