"""One LoRA training step on the SD1.5-architecture model (random weights),
CPU, 256x256 (32x32 latents), batch 1, LoRA r16, cached latents:

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

    def __init__(self, real_training_loss):
        self.real_training_loss = real_training_loss
        self.bare: list[float] = []
        self.reference: list[float] = []
        self.inserted: list[float] = []
        self.optimizer = None

    def _prepare(self, unet) -> None:
        from peft import LoraConfig

        unet.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian",
                                    target_modules=TARGETS))  # fmt: skip
        params = [p for name, p in unet.named_parameters() if "lora_" in name]
        self.optimizer = torch.optim.AdamW(params, lr=1e-4)
        generator = torch.Generator().manual_seed(0)
        self.latents = torch.randn(1, 4, 32, 32, generator=generator)
        self.text = torch.randn(1, 77, 768, generator=generator)

    def _bare(self, unet) -> None:
        x = self.latents.clone().requires_grad_(True)
        unet(x, torch.tensor([500]), self.text).sample.square().mean().backward()

    def _reference(self, unet, scheduler) -> None:
        noise = torch.randn_like(self.latents)
        t = torch.randint(0, 1000, (1,))
        noisy = scheduler.add_noise(self.latents, noise, t)
        loss = torch.nn.functional.mse_loss(unet(noisy, t, self.text).sample, noise)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def __call__(self, config, sd, network, *args):
        unet = sd.unet
        if self.optimizer is None:
            self._prepare(unet)
        inserted_start = time.perf_counter()
        network.set_enabled(False)
        unet.disable_adapters()
        start = time.perf_counter()
        self._bare(unet)
        self.bare.append(time.perf_counter() - start)
        unet.enable_adapters()
        start = time.perf_counter()
        self._reference(unet, sd.noise_scheduler)
        self.reference.append(time.perf_counter() - start)
        unet.disable_adapters()
        network.set_enabled(True)
        self.inserted.append(time.perf_counter() - inserted_start)
        return self.real_training_loss(config, sd, network, *args)


def make_dataset(workdir: Path) -> Path:
    from PIL import Image

    data = workdir / "data"
    data.mkdir(exist_ok=True)
    for i in range(4):
        Image.new("RGB", (256, 256), (60 * i, 100, 200)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"image {i}")
    return data


def measure(model_dir: Path, workdir: Path, steps: int) -> dict[str, list[float]]:
    import trainer.train as train_module
    from trainer.config import load_config

    settings = {
        "model.path": str(model_dir), "dataset.path": str(make_dataset(workdir)),
        "dataset.resolution": 256, "dataset.buckets": False, "dataset.cache_latents": "memory",
        "network.rank": 16, "network.alpha": 16, "network.train_text_encoder": False,
        "train.steps": steps, "train.batch_size": 1, "train.scheduler": "constant",
        "output.dir": str(workdir / "out"),
    }  # fmt: skip
    shutil.rmtree(workdir / "out", ignore_errors=True)  # train afresh, not as a resume
    interleaved = InterleavedSteps(train_module.training_loss)
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
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    times = measure(build_model_folder(args.workdir), args.workdir, args.steps)
    # The first two steps warm up allocator and kernels; each later step gives a ratio
    # between neighbours measured seconds apart.
    kept = {name: values[2:] for name, values in times.items()}
    for name, values in kept.items():
        print(f"{name:9s} median {statistics.median(values):.3f} s  "
              f"({', '.join(f'{v:.2f}' for v in values)})")  # fmt: skip
    steps = list(zip(kept["bare"], kept["reference"], kept["ours"], strict=True))
    print(f"reference / bare: {statistics.median(r / b for b, r, _ in steps):.3f}x")
    print(f"ours / bare:      {statistics.median(o / b for b, _, o in steps):.3f}x")
    print(f"ours / reference: {statistics.median(o / r for _, r, o in steps):.3f}x")


if __name__ == "__main__":
    main()
