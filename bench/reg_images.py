"""What dataset.reg_path costs: time per training step and per epoch with
regularization images on and off, on the demo model at the same batch size.

Each step is the trainer's own batch load (cached latents, as
dataset.cache_latents = "memory") + `training_loss` (with the reg samples'
prior_loss_weight) + backward + optimizer step. The two runs are interleaved
step by step in one process on one U-Net (their adapters are separate), so
drift on a shared CPU hits both alike; the table gives the medians. Reg samples
cost what training samples cost; what changes is the epoch, twice as many samples.

    python -m bench.reg_images [--steps N] [--batch B] [--images N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from bench.demo_step import run_parts, timed_step


def make_folder(root: Path, name: str, count: int, seed: int, caption: str) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / name).mkdir(parents=True)
    for i in range(count):
        arr = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / name / f"{i}.png")
        (root / name / f"{i}.txt").write_text(f"{caption} {i}")
    return root


def pipeline(folder: Path, args, reg: Path | None):
    from trainer.config import PRESETS_DIR, load_config

    overrides = {"dataset.path": str(folder / "train"), "train.batch_size": args.batch,
                 "train.optimizer": "sgd", "dataset.cache_latents": "memory",
                 "train.prior_loss_weight": 0.5,
                 **({"dataset.reg_path": str(reg)} if reg else {})}
    config = load_config(PRESETS_DIR / "cpu-demo.toml",
                         [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
    _, sd, network, data, ctx = run_parts(config, args.batch, reg=True)
    optimizer = torch.optim.SGD(list(network.parameters()), lr=1e-3)
    return {"config": config, "sd": sd, "network": network, "data": data,
            "batches": data.batches(), "optimizer": optimizer, "ctx": ctx, "times": []}


def timed_run_step(run: dict, step: int) -> float:
    batches = run["batches"]
    return timed_step(run["config"], run["sd"], run["network"], lambda: next(batches),
                      run["optimizer"], run["ctx"], step)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--images", type=int, default=8, help="training and reg images each")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_folder(folder / "train", "2_sks shape", args.images, 0, "sks shape")
        reg = make_folder(folder / "reg", "1_shape", args.images, 1, "a shape")
        runs = {"off": pipeline(folder, args, None), "on": pipeline(folder, args, reg)}
        for run in runs.values():  # warm-up, not timed
            timed_run_step(run, 0)
        for step in range(1, args.steps + 1):
            for run in runs.values():
                run["times"].append(timed_run_step(run, step))
    print("| reg images | median s/step | samples/epoch | steps/epoch | s/epoch |")
    print("|---|---|---|---|---|")
    for name, run in runs.items():
        median = statistics.median(run["times"])
        data = run["data"]
        print(f"| {name} | {median:.4f} | {data.sampler.samples_per_epoch} | {len(data)} | "
              f"{median * len(data):.2f} |")


if __name__ == "__main__":
    main()
