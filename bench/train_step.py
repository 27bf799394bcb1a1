"""One LoRA training step on the SD1.5-architecture model (random weights),
CPU, 256x256 (32x32 latents), batch 1, LoRA r16, cached latents:

- bare: the frozen U-Net forward+backward with only its input requiring grad;
- reference: the loop of diffusers' `train_text_to_image_lora.py` with peft
  (noise, timesteps, add_noise, U-Net, MSE, backward, AdamW step);
- ours: `trainer.train.run` end to end (data included), step times from its
  metrics.jsonl.

    python -m bench.train_step [--steps N] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
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


def timed(step, repeats: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bare_and_reference(model_dir: Path, repeats: int) -> tuple[float, float]:
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet").requires_grad_(False)
    scheduler = DDPMScheduler.from_pretrained(model_dir / "scheduler")
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 32, 32, generator=generator)
    text = torch.randn(1, 77, 768, generator=generator)

    def bare():
        x = latents.clone().requires_grad_(True)
        unet(x, torch.tensor([500]), text).sample.square().mean().backward()

    bare_s = timed(bare, repeats)
    unet.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian",
                                target_modules=TARGETS))  # fmt: skip
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def reference():
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (1,))
        noisy = scheduler.add_noise(latents, noise, t)
        loss = torch.nn.functional.mse_loss(unet(noisy, t, text).sample, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return bare_s, timed(reference, repeats)


def ours(model_dir: Path, workdir: Path, steps: int) -> float:
    from PIL import Image

    from trainer.config import load_config
    from trainer.train import run

    data = workdir / "data"
    data.mkdir(exist_ok=True)
    for i in range(4):
        Image.new("RGB", (256, 256), (60 * i, 100, 200)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"image {i}")
    settings = {
        "model.path": str(model_dir), "dataset.path": str(data), "dataset.resolution": 256,
        "dataset.buckets": False, "dataset.cache_latents": "memory", "network.rank": 16,
        "network.alpha": 16, "network.train_text_encoder": False, "train.steps": steps,
        "train.batch_size": 1, "train.scheduler": "constant", "output.dir": str(workdir / "out"),
    }  # fmt: skip
    run(load_config(None, [f"{k}={json.dumps(v)}" for k, v in settings.items()]))
    lines = (workdir / "out" / "metrics.jsonl").read_text().splitlines()
    return statistics.median(1 / json.loads(line)["it_s"] for line in lines[2:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "bench-train")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    model_dir = build_model_folder(args.workdir)
    ours_s = ours(model_dir, args.workdir, args.steps)
    bare_s, reference_s = bare_and_reference(model_dir, args.steps - 2)
    print(f"bare frozen U-Net fwd+bwd: {bare_s:.3f} s")
    print(f"diffusers+peft reference step: {reference_s:.3f} s ({reference_s / bare_s:.3f}x bare)")
    print(f"ours, whole step incl. data: {ours_s:.3f} s ({ours_s / bare_s:.3f}x bare, "
          f"{ours_s / reference_s:.3f}x reference)")  # fmt: skip


if __name__ == "__main__":
    main()
