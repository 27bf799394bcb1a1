"""Training throughput and memory on a GPU (issue [3/5]), run when one is lent.

SD1.5-architecture model (random weights), 512x512, bf16 autocast, cached
latents, LoRA r16 on the attention set, through `trainer.train.run`:

- batch 1 with gradient checkpointing: peak VRAM (target <= 4 GB);
- batch 1 and batch 8 without: it/s, images/s, peak VRAM and model-FLOPs
  utilisation against the GPU's own measured bf16 matmul peak (target for
  batch 8 >= 35%; a LoRA step is about 1.6 TFLOP per image at 512x512,
  scaled by pixel count at other sizes);
- the same training cases with `train.compile` (eager/compiled columns), with
  the compile time of the bucket shape (the first step's extra time);
- LCM-LoRA distillation (issue [4/5]) at batch 8 with the sd15-lcm-distill
  network (LoCon rank 64): images/s and peak VRAM (its MFU is not comparable:
  a distillation step runs the U-Net four times).

    python -m bench.train_step_gpu [--workdir DIR] [--steps N] [--out DIR]
    python -m bench.train_step_gpu --smoke   # demo model, 64 px, any device

`--smoke` checks the script itself on the tiny demo model; its MFU and VRAM
numbers mean nothing.
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

TFLOP_PER_IMAGE_512 = 1.6
CASES = [  # (task, batch, gradient checkpointing, train.compile)
    ("train", 1, True, False),
    ("train", 1, False, False),
    ("train", 8, False, False),
    ("lcm_distill", 8, False, False),
]
# Compiled columns (issue [3/6]); the first step's time is the compile of the
# one bucket shape. Not in --smoke: Inductor builds kernels for minutes on a CPU.
COMPILED_CASES = [("train", 1, True, True), ("train", 1, False, True), ("train", 8, False, True)]
LCM_NETWORK = {"network.type": "locon", "network.rank": 64, "network.alpha": 64,
               "network.conv_rank": 64, "network.conv_alpha": 64}  # fmt: skip


def matmul_peak_tflops(device: torch.device, size: int, repeats: int = 20) -> float:
    """What this device's bf16 matmul actually reaches (the MFU denominator)."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_dataset(folder: Path, resolution: int, count: int = 16) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        colour = (37 * i % 256, 90 + 9 * i, 200 - 11 * i)
        Image.new("RGB", (resolution, resolution), colour).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"a flat colour swatch number {i}")
    return folder


def train_case(model: Path, data: Path, out: Path, case: tuple, args) -> dict:
    from trainer.config import load_config
    from trainer.train import run

    task, batch, checkpointing, compiled = case
    settings = {
        "model.path": str(model), "dataset.path": str(data),
        "dataset.resolution": args.resolution, "dataset.buckets": False,
        "dataset.cache_latents": "memory", "network.rank": 16, "network.alpha": 16,
        "network.train_text_encoder": False, "train.steps": args.steps,
        "train.batch_size": batch, "train.scheduler": "constant",
        "train.mixed_precision": "bf16", "train.gradient_checkpointing": checkpointing,
        "train.compile": compiled,
        "output.dir": str(out), "task": task,
        **(LCM_NETWORK if task == "lcm_distill" else {}),
    }  # fmt: skip
    shutil.rmtree(out, ignore_errors=True)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    run(load_config(None, [f"{k}={json.dumps(v)}" for k, v in settings.items()]))
    lines = (out / "metrics.jsonl").read_text().splitlines()
    step_s = [1 / json.loads(line)["it_s"] for line in lines]
    it_s = 1 / statistics.median(step_s[2:])
    return {
        "task": task,
        "batch": batch,
        "gradient_checkpointing": checkpointing,
        "compile": compiled,
        "first_step_extra_s": step_s[0] - statistics.median(step_s[2:]),
        "it_s": it_s,
        "images_s": it_s * batch,
        "peak_vram_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="demo model, 64 px: checks the script")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "bench-gpu")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    args.resolution = 64 if args.smoke else 512
    args.steps = args.steps or (4 if args.smoke else 20)
    args.workdir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    if args.smoke:
        from trainer.demo_model import make_demo_model

        model = make_demo_model(args.workdir / "demo")["diffusers"]
    else:
        from bench.train_step import build_model_folder

        model = build_model_folder(args.workdir)
    data = make_dataset(args.workdir / f"data-{args.resolution}", args.resolution)
    peak = matmul_peak_tflops(device, 256 if args.smoke else 8192)
    tflop_per_image = TFLOP_PER_IMAGE_512 * (args.resolution / 512) ** 2
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report = {"device": device_name, "resolution": args.resolution, "steps": args.steps,
              "bf16_matmul_peak_tflops": peak, "cases": []}  # fmt: skip
    for task, batch, checkpointing, compiled in CASES + ([] if args.smoke else COMPILED_CASES):
        case = train_case(model, data, args.workdir / "out",
                          (task, batch, checkpointing, compiled), args)
        if task == "train":
            case["mfu"] = case["images_s"] * tflop_per_image / peak
        report["cases"].append(case)
        vram = case["peak_vram_gb"]
        mfu = f", MFU {case['mfu']:.1%}" if "mfu" in case else ""
        print(f"{task}, batch {batch}, checkpointing {checkpointing}, compile {compiled}: "
              f"{case['it_s']:.3f} it/s, first step +{case['first_step_extra_s']:.1f} s, "
              f"{case['images_s']:.2f} images/s{mfu}, peak VRAM "
              f"{'n/a' if vram is None else f'{vram:.2f} GB'}", flush=True)  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    name = "train_step_gpu_smoke.json" if args.smoke else "train_step_gpu.json"
    (args.out / name).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
