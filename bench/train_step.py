"""One LoRA training step on the SD1.5-architecture model (random weights),
by default on the CPU at 256x256 (32x32 latents), batch 1, fp32, LoRA r16,
cached latents (on a GPU, if there is one; `--resolution`, `--batch` and
`--mixed-precision` change the setup):

- bare: the frozen U-Net forward+backward with only its input requiring grad;
- reference: the loop of diffusers' `train_text_to_image_lora.py` with peft
  (noise, timesteps, add_noise, U-Net, MSE, backward, AdamW step);
- ours: `trainer.train.run` end to end (data included), step times from its
  metrics.jsonl.

Step times drift by +-10-20% between processes and over minutes on a shared
CPU, so all three run in one process on one U-Net, interleaved step by step:
the bench wraps the trainer's `training_loss`, and before each of our steps
runs a bare step (our adapters off, peft's off) and a reference step (peft's
LoRA on the same modules, ours off). Our step = the loop's own step time minus
the time spent in those two. The disabled wrappers and hooks left in the bare
step cost about 400 Python calls, well under 0.1% of it.

    python -m bench.train_step [--steps N] [--workdir DIR]
    python -m bench.train_step --resolution 512 --batch 8 --mixed-precision bf16  # GPU
    python -m bench.train_step --compile  # our column compiled (train.compile)
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


def build_model_folder(folder: Path) -> Path:
    """A diffusers folder of a random-weight SD1.5 (about 4 GB; reused if present)."""
    diffusers_dir = folder / "sd15-random"
    if (diffusers_dir / "model_index.json").exists():
        return diffusers_dir
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from trainer.sd15_config import build_sd15_from_config, load_sd15_config
    from trainer.tokenizer import load_offline_tokenizer

    sd = build_sd15_from_config(with_vae=True, seed=0)
    pipe = StableDiffusionPipeline(
        vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=load_offline_tokenizer(),
        unet=sd.unet, scheduler=DDPMScheduler.from_config(load_sd15_config("scheduler")),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(diffusers_dir)
    return diffusers_dir


class InterleavedSteps:
    """Runs a bare and a reference step before each of our training steps."""

    def __init__(self, real_training_loss, batch: int, latent_size: int):
        self.real_training_loss = real_training_loss
        self.shape = (batch, 4, latent_size, latent_size)
        self.bare: list[float] = []
        self.reference: list[float] = []
        self.inserted: list[float] = []
        self.optimizer = None

    def _prepare(self, unet, ctx) -> None:
        from peft import LoraConfig

        unet.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian",
                                    target_modules=TARGETS))  # fmt: skip
        params = [p for name, p in unet.named_parameters() if "lora_" in name]
        self.optimizer = torch.optim.AdamW(params, lr=1e-4)
        generator = torch.Generator().manual_seed(0)
        self.ctx = ctx  # the trainer's device and autocast: all three run alike
        self.latents = torch.randn(self.shape, generator=generator).to(ctx.device)
        text_shape = (self.shape[0], 77, unet.config.cross_attention_dim)
        self.text = torch.randn(text_shape, generator=generator).to(ctx.device)
        self.t = torch.full((self.shape[0],), 500, device=ctx.device)

    def _bare(self, unet) -> None:
        x = self.latents.clone().requires_grad_(True)
        with self.ctx.autocast():
            out = unet(x, self.t, self.text).sample
        out.float().square().mean().backward()

    def _reference(self, unet, scheduler) -> None:
        noise = torch.randn_like(self.latents)
        t = torch.randint(0, 1000, (self.shape[0],), device=self.ctx.device)
        noisy = scheduler.add_noise(self.latents, noise, t)
        with self.ctx.autocast():
            out = unet(noisy, t, self.text).sample
        torch.nn.functional.mse_loss(out.float(), noise).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _timed(self, step, *args) -> float:
        synchronize(self.ctx.device)
        start = time.perf_counter()
        step(*args)
        synchronize(self.ctx.device)
        return time.perf_counter() - start

    def __call__(self, config, sd, network, tb, mine, generator, train_te, ctx):
        unet = sd.unet
        if self.optimizer is None:
            self._prepare(unet, ctx)
        synchronize(ctx.device)
        inserted_start = time.perf_counter()
        network.set_enabled(False)
        unet.disable_adapters()
        self.bare.append(self._timed(self._bare, unet))
        unet.enable_adapters()
        self.reference.append(self._timed(self._reference, unet, sd.noise_scheduler))
        unet.disable_adapters()
        network.set_enabled(True)
        self.inserted.append(time.perf_counter() - inserted_start)
        return self.real_training_loss(config, sd, network, tb, mine, generator, train_te, ctx)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_dataset(workdir: Path, resolution: int, count: int) -> Path:
    from PIL import Image

    data = workdir / f"data-{resolution}-{count}"
    data.mkdir(exist_ok=True)
    for i in range(count):
        Image.new("RGB", (resolution, resolution), (60 * i % 256, 100, 200)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"image {i}")
    return data


def measure(model_dir: Path, workdir: Path, args) -> dict[str, list[float]]:
    import trainer.train as train_module
    from trainer.config import load_config

    settings = {
        "model.path": str(model_dir),
        "dataset.path": str(make_dataset(workdir, args.resolution, max(4, args.batch))),
        "dataset.resolution": args.resolution, "dataset.buckets": False,
        "dataset.cache_latents": "memory", "network.rank": 16, "network.alpha": 16,
        "network.train_text_encoder": False, "train.steps": args.steps,
        "train.batch_size": args.batch, "train.scheduler": "constant",
        "train.mixed_precision": args.mixed_precision, "output.dir": str(workdir / "out"),
        "train.compile": args.compile,
    }  # fmt: skip
    shutil.rmtree(workdir / "out", ignore_errors=True)  # train afresh, not as a resume
    interleaved = InterleavedSteps(train_module.training_loss, args.batch, args.resolution // 8)
    train_module.training_loss = interleaved
    try:
        train_module.run(load_config(None, [f"{k}={json.dumps(v)}" for k, v in settings.items()]))
    finally:
        train_module.training_loss = interleaved.real_training_loss
    lines = (workdir / "out" / "metrics.jsonl").read_text().splitlines()
    step_times = [1 / json.loads(line)["it_s"] for line in lines]
    ours = [total - extra for total, extra in zip(step_times, interleaved.inserted, strict=True)]
    return {"bare": interleaved.bare, "reference": interleaved.reference, "ours": ours}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "bench-train")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"))
    parser.add_argument("--compile", action="store_true",
                        help="our steps with train.compile (the compiled column); the bare "
                             "and reference steps stay eager")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    times = measure(build_model_folder(args.workdir), args.workdir, args)
    # The first two steps warm up allocator and kernels; each later step gives a ratio
    # between neighbours measured seconds apart.
    kept = {name: values[2:] for name, values in times.items()}
    print(f"ours, first step: {times['ours'][0]:.1f} s (with --compile: the compile)")
    for name, values in kept.items():
        print(f"{name:9s} median {statistics.median(values):.3f} s  "
              f"({', '.join(f'{v:.2f}' for v in values)})")  # fmt: skip
    steps = list(zip(kept["bare"], kept["reference"], kept["ours"], strict=True))
    print(f"reference / bare: {statistics.median(r / b for b, r, _ in steps):.3f}x")
    print(f"ours / bare:      {statistics.median(o / b for b, _, o in steps):.3f}x")
    print(f"ours / reference: {statistics.median(o / r for _, r, o in steps):.3f}x")


if __name__ == "__main__":
    main()
