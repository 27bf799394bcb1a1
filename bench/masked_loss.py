"""What dataset.masked_loss costs per training step: the trainer's own
`training_loss` + backward + optimizer step on one fixed batch of the demo model,
with the batch's masks off, on the latent grid (as cached latents carry them),
and at pixel size (as an uncached run carries them: averaged down in the loss).

The three run interleaved, step by step, in one process on one U-Net, so drift
on a shared CPU hits all alike; the table gives each one's median and its
difference to "off". Loading the masks (a file or the alpha channel, per image)
is data-pipeline time and not in these numbers.

    python -m bench.masked_loss [--steps N] [--resolution PX] [--batch B]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
from pathlib import Path

import torch

from bench.demo_step import run_parts, timed_step


def make_dataset(folder: Path, resolution: int, count: int) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        arr = rng.integers(0, 256, (resolution, resolution, 4), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"{i}.png")  # random alpha: a mask
        (folder / f"{i}.txt").write_text(f"image {i}")
    return folder


def setup_run(folder: Path, args):
    from datasets_tools.masks import to_grid
    from trainer.config import PRESETS_DIR, load_config

    data_dir = make_dataset(folder, args.resolution, args.batch)
    overrides = {"dataset.path": str(data_dir), "dataset.resolution": args.resolution,
                 "dataset.masked_loss": True, "train.batch_size": args.batch,
                 "train.optimizer": "sgd", "dataset.cache_latents": "off"}
    config = load_config(PRESETS_DIR / "cpu-demo.toml",
                         [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
    _, sd, network, data, ctx = run_parts(config, args.batch)
    tb = next(iter(data.batches()))
    grid = (args.resolution // 8, args.resolution // 8)
    batches = {"off": dataclasses.replace(tb, masks=None),
               "latent-grid mask": dataclasses.replace(tb, masks=to_grid(tb.masks, grid)),
               "pixel-size mask": tb}
    return config, sd, network, batches, ctx


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.masked_loss")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per variant")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        config, sd, network, batches, ctx = setup_run(Path(folder), args)
        optimizer = torch.optim.SGD(network.parameters(), lr=1e-4)
        network.train()
        times: dict[str, list[float]] = {name: [] for name in batches}
        for step in range(args.steps + 3):  # 3 warm-up rounds, not counted
            for name, tb in batches.items():
                seconds = timed_step(config, sd, network, lambda tb=tb: tb, optimizer, ctx)
                if step >= 3:
                    times[name].append(seconds)
        network.detach()
    off = statistics.median(times["off"])
    print(f"demo model, {args.resolution} px, batch {args.batch}, {args.steps} interleaved "
          f"steps per variant, {ctx.device.type}")
    print("| masks | median step (ms) | vs off |")
    print("|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median * 1e3:.2f} | {100 * (median / off - 1):+.1f}% |")


if __name__ == "__main__":
    main()
