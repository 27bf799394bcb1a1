"""The evidence benchmark's measurements (`bench.lcm_evidence`): the
teacher's reference samples from fixed noises, and the student's errors
against them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.lcm_evidence_data import (
    NUM_CLASSES,
    class_embeddings,
    consistency_on_path,
    ddim_sample,
    lcm_sample_diffusers,
    lcm_sample_ours,
    null_embedding,
)
from trainer.lcm import cfg


def mse(a, b) -> float:
    return F.mse_loss(a, b).item()


def max_abs(a, b) -> float:
    return (a - b).abs().max().item()


class Evaluation:
    """Fixed noises and classes, and the teacher's samples from them (taken
    once, before any adapter is attached)."""

    def __init__(self, unet, scheduler, args):
        self.config, self.alphas_cumprod = scheduler.config, scheduler.alphas_cumprod
        self.w = (args.w_min + args.w_max) / 2
        g = torch.Generator().manual_seed(2026)
        shape = (args.samples, 4, args.size, args.size)
        self.noise = torch.randn(shape, generator=g).to(args.device)
        classes = torch.arange(args.samples) % NUM_CLASSES
        self.cond = class_embeddings(classes).to(args.device)
        uncond = null_embedding().to(args.device)
        start = time.perf_counter()
        config, noise, cond, w = self.config, self.noise, self.cond, self.w
        self.path = dict.fromkeys((999, 759, 499, 259))
        self.teacher50 = ddim_sample(unet, config, noise, cond, uncond, w, 50, path=self.path)
        self.teacher4 = ddim_sample(unet, config, noise, cond, uncond, w, 4)
        teacher4_leading = ddim_sample(unet, config, noise, cond, uncond, w, 4, "leading")
        teacher_lcm4, self.timesteps = lcm_sample_diffusers(unet, config, noise, cond, 4, seed=5)
        ac, uncond = self.alphas_cumprod, uncond.expand_as(cond)
        cond_jumps = consistency_on_path(unet, ac, self.path, cond)
        uncond_jumps = consistency_on_path(unet, ac, self.path, uncond)
        # f is linear in x0, so CFG of the two maps is the map of the CFG'd x0.
        teacher_jumps = {t: cfg(cond_jumps[t], uncond_jumps[t], w) for t in self.path}
        self.teacher = {
            "guidance_w_eval": w,
            "lcm_timesteps": self.timesteps,
            "mse_teacher4_vs_teacher50": mse(self.teacher4, self.teacher50),
            "mse_teacher4_leading_vs_teacher50": mse(teacher4_leading, self.teacher50),
            "mse_undistilled_lcm4_vs_teacher50": mse(teacher_lcm4, self.teacher50),
            "teacher50_latent_var": self.teacher50.var().item(),
            **{f"mse_teacher_jump_from_{t}_vs_teacher50": mse(jump, self.teacher50)
               for t, jump in teacher_jumps.items()},  # fmt: skip
            "teacher_eval_seconds": time.perf_counter() - start,
        }

    def student(self, unet, prefix: str = "") -> tuple[dict, dict]:
        """The adapted U-Net's errors against the 50-step reference: 4-step
        `LCMScheduler`, 4-step deterministic and 1 step; and its samples."""
        config, noise, cond = self.config, self.noise, self.cond
        samples = {
            "student4": lcm_sample_diffusers(unet, config, noise, cond, 4, seed=5)[0],
            "student4_deterministic": lcm_sample_ours(
                unet, self.alphas_cumprod, noise, cond, self.timesteps, 5, True
            ),
            "student1": lcm_sample_diffusers(unet, config, noise, cond, 1, seed=5)[0],
        }
        teacher4_mse = self.teacher["mse_teacher4_vs_teacher50"]
        metrics = {}
        # Where along the path the consistency map goes wrong: one jump from
        # the reference's own x_t (the 4-step sampler's timesteps).
        jumps = consistency_on_path(unet, self.alphas_cumprod, self.path, cond)
        for t, jump in jumps.items():
            metrics[f"mse_{prefix}jump_from_{t}_vs_teacher50"] = mse(jump, self.teacher50)
        for name, sample in samples.items():
            metrics[f"mse_{prefix}{name}_vs_teacher50"] = mse(sample, self.teacher50)
        for name in ("student4", "student4_deterministic"):
            ratio = metrics[f"mse_{prefix}{name}_vs_teacher50"] / teacher4_mse
            metrics[f"ratio_{prefix}{name}"] = ratio
        return metrics, samples

    def student_and_ema(self, unet, ema) -> tuple[dict, dict]:
        """`student`'s numbers, and with an EMA target also those of its EMA
        weights (keys prefixed `ema_`); the samples are the live weights'."""
        metrics, samples = self.student(unet)
        if ema:
            with ema.swapped_in():
                metrics |= self.student(unet, prefix="ema_")[0]
        return metrics, samples


def evaluate(unet, network, ema, evaluation) -> tuple[dict, list[torch.Tensor]]:
    """The final numbers: the student's (and its EMA weights', when there are
    any), and the check that our hooked sampling matches `LCMScheduler` on
    the U-Net with the LoRA merged."""
    start = time.perf_counter()
    ev = evaluation
    metrics, samples = ev.student_and_ema(unet, ema)
    ours_hooked = lcm_sample_ours(unet, ev.alphas_cumprod, ev.noise, ev.cond, ev.timesteps, seed=5)
    network.merge()
    student4_merged, _ = lcm_sample_diffusers(unet, ev.config, ev.noise, ev.cond, 4, seed=5)
    network.unmerge()
    results = {
        **ev.teacher,
        **metrics,
        "max_abs_ours_hooked_vs_diffusers_merged": max_abs(ours_hooked, student4_merged),
        "max_abs_diffusers_hooked_vs_merged": max_abs(samples["student4"], student4_merged),
    }
    results["eval_seconds"] = time.perf_counter() - start
    # Old names, kept so earlier result files stay comparable.
    results["ratio"] = results.pop("ratio_student4")
    results["ratio_deterministic"] = results.pop("ratio_student4_deterministic")
    results["goal_met"] = results["ratio"] <= 0.5
    results["goal_met_deterministic"] = results["ratio_deterministic"] <= 0.5
    rows = (ev.teacher50, ev.teacher4, samples["student4"], samples["student4_deterministic"])
    return results, [row.cpu() for row in rows]


def curve_recorder(unet, evaluation, path: Path):
    """An `on_eval` for `distill`: the student's errors (and its EMA weights')
    so far, rewritten to `path` each time so a run cut short keeps its curve."""
    curve = []

    def record(_network, ema, step, loss):
        point = {"step": step, "loss": loss, **evaluation.student_and_ema(unet, ema)[0]}
        curve.append(point)
        print("  eval " + json.dumps(point), flush=True)
        path.write_text(json.dumps({"teacher": evaluation.teacher, "curve": curve}, indent=1))

    return curve, record
