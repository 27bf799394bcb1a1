"""Evidence that our LCM-LoRA distillation is right, end to end, on a CPU.

1. Train a small teacher U-Net here, on synthetic coloured shapes used
   directly as 4-channel "latents" (`bench.lcm_evidence_data`), with SD1.5's
   noise schedule (scaled_linear 0.00085-0.012, 1000 steps, epsilon) and 10%
   null-prompt dropout so classifier-free guidance works.
2. Distill an LCM-LoRA (LoCon) from it with `trainer.lcm.distillation_loss`:
   student = the U-Net with adapters on, teacher = adapters off.
3. Over fixed noises and classes, compare against the teacher's 50-step DDIM
   sample with CFG at the middle of the guidance range: the student's 4-step
   LCM sample (diffusers `LCMScheduler`, no CFG) and the teacher's 4-step DDIM
   sample (same CFG). Goal: student MSE <= 0.5 x teacher-4 MSE. Also checks
   that our own multistep sampling (written with `trainer.lcm`, adapters as
   hooks) matches `LCMScheduler` on the U-Net with the LoRA merged.
   The student is also sampled deterministically (re-noising with its own
   noise prediction, TCD's gamma = 0), which keeps each sample tied to its
   starting noise, as the reference is (fresh noise moves it to another path).
4. Write a picture grid (rows: teacher 50-step, teacher 4-step, student
   4-step LCM, student 4-step deterministic) and a JSON of the numbers.
5. With `--eval-every N`, the same student numbers every N steps (a curve
   JSON rewritten each time), plus one jump of the consistency map from the
   reference's own path at 999, 759, 499 and 259: where the error comes from.
   `--student full` distills the whole U-Net (LCM) instead of a LoCon, and
   `--distill-data teacher` distills on the teacher's own samples.

    python -m bench.lcm_evidence [--quick] [--out bench/results] [--threads 1]
                                 [--device cuda] [--distill-schedule cosine]
                                 [--target-ema 0.99] [--eval-every 500]
                                 [--student full] [--distill-data teacher]
                                 [--loss l2] [--tag _run1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.lcm_evidence_data import (
    NUM_CLASSES,
    class_embeddings,
    ddim_sample,
    make_latents,
    null_embedding,
    save_grid,
    tiny_unet,
)
from bench.lcm_evidence_eval import Evaluation, curve_recorder, evaluate
from networks.network import AdapterNetwork, NetworkSpec
from trainer.lcm import EmaTarget, distillation_loss
from trainer.sd15_config import load_sd15_config

FULL = dict(size=16, teacher_steps=2000, teacher_batch=32, teacher_lr=1.5e-3,
            distill_steps=1000, distill_batch=16, distill_lr=1e-3, samples=200)  # fmt: skip
QUICK = dict(size=8, teacher_steps=10, teacher_batch=8, teacher_lr=1e-3,
             distill_steps=4, distill_batch=4, distill_lr=1e-3, samples=6)  # fmt: skip
GRID_COLUMNS = 18


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke-test version (seconds)")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--threads", type=int, default=1)
    # One guidance scale, the evaluation's: the SD1.5 student has no w input, so
    # with a range it can only learn an average of the guided ODEs.
    p.add_argument("--w-min", type=float, default=2.0)
    p.add_argument("--w-max", type=float, default=2.0)
    p.add_argument("--rank", type=int, default=8, help="LoCon rank (= alpha) for all layers")
    p.add_argument("--teacher-cache", type=Path, help="load the teacher from here, or save it")
    p.add_argument("--device", default="cpu", help="cpu or cuda (random draws stay on the CPU)")
    p.add_argument("--target-ema", type=float, default=0.0,
                   help="EMA decay of the target's adapter weights (0: the student itself)")
    p.add_argument("--distill-schedule", choices=("constant", "cosine"), default="constant",
                   help="distillation learning rate: constant, or cosine down to 0")
    p.add_argument("--student", choices=("locon", "full"), default="locon",
                   help="train a LoCon (LCM-LoRA), or the whole U-Net (LCM) as a check")
    p.add_argument("--distill-data", choices=("shapes", "teacher"), default="shapes",
                   help="distill on fresh synthetic shapes, or on the teacher's own samples")
    p.add_argument("--teacher-pool", type=int, default=1536,
                   help="how many 50-step teacher samples --distill-data teacher draws from")
    p.add_argument("--loss", choices=("huber", "l2"), default="huber")
    p.add_argument("--huber-c", type=float, default=0.001)
    p.add_argument("--eval-every", type=int, default=0,
                   help="also measure the student every N distillation steps (0: only at the end)")
    p.add_argument("--tag", default="", help="output file name suffix, for runs side by side")
    for key, value in FULL.items():
        p.add_argument("--" + key.replace("_", "-"), type=type(value), default=None)
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def noise_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(load_sd15_config("scheduler"))


def recent_mean(losses: list[float], window: int = 100) -> float:
    recent = losses[-window:]
    return sum(recent) / len(recent)


def log_progress(label: str, step: int, losses: list[float], started: float) -> None:
    """Every 250 steps: the mean of the last 100 losses and the time so far."""
    if (step + 1) % 250 == 0:
        print(f"  {label} step {step + 1}: loss {recent_mean(losses):.5f} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip


def train_teacher(unet, scheduler, args) -> dict:
    """Plain epsilon objective, AdamW, 10% of the prompts replaced by the null one."""
    g = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.teacher_lr, weight_decay=0.0)

    def lr_factor(step):  # 100 warm-up steps, then cosine down to 2%
        cosine = 0.5 * (1 + math.cos(math.pi * step / args.teacher_steps))
        return max(min(1.0, step / 100) * cosine, 0.02)

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    unet.train()
    start, losses = time.perf_counter(), []
    for step in range(args.teacher_steps):
        classes = torch.randint(0, NUM_CLASSES, (args.teacher_batch,), generator=g)
        latents = make_latents(classes, args.size, g)
        emb = class_embeddings(classes)
        drop = torch.rand(len(classes), generator=g) < 0.1
        emb = torch.where(drop[:, None, None], null_embedding(), emb)
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, 1000, (len(classes),), generator=g)
        latents, emb, noise, t = (x.to(args.device) for x in (latents, emb, noise, t))
        loss = F.mse_loss(unet(scheduler.add_noise(latents, noise, t), t, emb).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        log_progress("teacher", step, losses, start)
    unet.eval()
    return {"seconds": time.perf_counter() - start, "final_loss": recent_mean(losses)}


def distill_lr_factor(args):
    """Constant, or cosine from 1 to 0 over the run (tried because with a
    constant rate the 4-step error stopped improving after 1000 steps; it
    helped a little, BENCHMARKS.md)."""
    if args.distill_schedule == "constant":
        return lambda step: 1.0
    return lambda step: 0.5 * (1 + math.cos(math.pi * step / args.distill_steps))


class FullStudent(torch.nn.Module):
    """Stands in for an adapter network when the whole U-Net is the student
    (LCM's original, not LoCon): `set_enabled(False)` swaps a frozen copy
    of the teacher's weights in, so `distillation_loss` runs unchanged. Used
    to tell the LoRA's capacity apart from the algorithm's limits."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet  # registered, so `parameters()` are the U-Net's
        self.adapters = []
        # A never-updated EmaTarget is a frozen copy with the storage swap
        # the EMA target already uses.
        self.teacher = EmaTarget(list(unet.named_parameters()), decay=1.0)
        self.teacher_swap = None

    def set_enabled(self, enabled: bool) -> None:
        if not enabled and self.teacher_swap is None:
            self.teacher_swap = self.teacher.swapped_in()
            self.teacher_swap.__enter__()
        elif enabled and self.teacher_swap is not None:
            self.teacher_swap.__exit__(None, None, None)
            self.teacher_swap = None

    def merge(self) -> None:  # the student's weights are the U-Net's already
        pass

    unmerge = merge


@torch.no_grad()
def teacher_pool(unet, scheduler, args) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's own 50-step DDIM samples (CFG at the evaluation's w, from
    noises drawn apart from the evaluation's): a distillation set on the
    teacher's sampling paths rather than on noised training images, which
    an under-trained teacher's paths do not pass through."""
    g = torch.Generator().manual_seed(77)
    classes = torch.randint(0, NUM_CLASSES, (args.teacher_pool,), generator=g)
    noise = torch.randn(args.teacher_pool, 4, args.size, args.size, generator=g)
    w, uncond, chunks = (args.w_min + args.w_max) / 2, null_embedding().to(args.device), []
    for start in range(0, args.teacher_pool, 256):
        part = slice(start, start + 256)
        cond = class_embeddings(classes[part]).to(args.device)
        chunks.append(ddim_sample(unet, scheduler.config, noise[part].to(args.device), cond,
                                  uncond, w, 50))  # fmt: skip
    return classes, torch.cat(chunks)


def distill(unet, scheduler, args, on_eval=None, pool=None):
    """`on_eval(network, ema, step, loss)` runs every `--eval-every` steps;
    `pool` (classes, latents) replaces the synthetic shapes as the data."""
    if args.student == "full":
        network = FullStudent(unet)
    else:
        unet.requires_grad_(False)
        spec = NetworkSpec("locon", rank=args.rank, alpha=args.rank, conv_rank=args.rank,
                           conv_alpha=args.rank, train_text_encoder=False)  # fmt: skip
        network = AdapterNetwork.create(spec, unet, None).attach()
    params = [p for p in network.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.distill_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, distill_lr_factor(args))
    g = torch.Generator().manual_seed(1)
    ema = EmaTarget.of_network(network, args.target_ema) if args.target_ema else None
    start, losses = time.perf_counter(), []
    for step in range(args.distill_steps):
        if pool is None:
            classes = torch.randint(0, NUM_CLASSES, (args.distill_batch,), generator=g)
            latents = make_latents(classes, args.size, g).to(args.device)
        else:
            index = torch.randint(0, len(pool[0]), (args.distill_batch,), generator=g)
            classes, latents = pool[0][index], pool[1][index.to(pool[1].device)]
        cond = class_embeddings(classes).to(args.device)
        loss = distillation_loss(
            unet, network, latents, cond, null_embedding().to(args.device), scheduler,
            g, args.w_min, args.w_max, args.loss, args.huber_c,
            target_weights=ema.swapped_in if ema else contextlib.nullcontext,
        )  # fmt: skip
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if ema:
            ema.update()
        losses.append(loss.item())
        log_progress("distill", step, losses, start)
        if on_eval and args.eval_every and (step + 1) % args.eval_every == 0:
            on_eval(network, ema, step + 1, recent_mean(losses))
    info = {"seconds": time.perf_counter() - start, "final_loss": recent_mean(losses),
            "parameters": sum(p.numel() for p in params),
            "adapters": len(network.adapters)}  # fmt: skip
    return network, ema, info


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    # TF32 convolutions (PyTorch's CUDA default) made hooked and merged
    # sampling differ by up to 1.1 after 4 steps: the check needs full fp32.
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    args.out.mkdir(parents=True, exist_ok=True)
    scheduler = noise_scheduler()
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(args.device)
    unet = tiny_unet(args.size).to(args.device)
    cache = args.teacher_cache
    if cache is not None and cache.is_file():
        unet.load_state_dict(torch.load(cache, map_location=args.device))
        unet.eval()
        teacher_info = {"loaded_from": str(cache)}
    else:
        teacher_info = train_teacher(unet, scheduler, args)
        if cache is not None:
            torch.save(unet.state_dict(), cache)
    print(f"teacher: {teacher_info}", flush=True)
    evaluation = Evaluation(unet, scheduler, args)
    name = ("lcm_evidence_quick" if args.quick else "lcm_evidence") + args.tag
    curve, record = curve_recorder(unet, evaluation, args.out / f"{name}_curve.json")
    pool = teacher_pool(unet, scheduler, args) if args.distill_data == "teacher" else None
    network, ema, distill_info = distill(unet, scheduler, args, record, pool)
    print(f"distill: {distill_info}", flush=True)
    results, rows = evaluate(unet, network, ema, evaluation)
    print(json.dumps(results), flush=True)
    grid = args.out / f"lcm_evidence{args.tag}.png"
    save_grid([row[:GRID_COLUMNS] for row in rows], grid)
    options = ("w_min", "w_max", "rank", "threads", "device", "distill_schedule", "target_ema",
               "loss", "huber_c", "student", "distill_data", "teacher_pool")  # fmt: skip
    setup = {k: getattr(args, k) for k in (*FULL, *options)}
    setup["unet_parameters"] = sum(p.numel() for p in unet.parameters())
    report = {"setup": setup, "teacher": teacher_info, "distill": distill_info, **results,
              "curve": curve, "grid": str(grid)}  # fmt: skip
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2))
    for key, value in results.items():
        print(f"{key}: {value}")
    return report


if __name__ == "__main__":
    main()
