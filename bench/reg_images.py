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
import time
from pathlib import Path

import torch


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
    from trainer import train_setup as setup
    from trainer.config import PRESETS_DIR, load_config
    from trainer.step_loss import StepContext

    overrides = {"dataset.path": str(folder / "train"), "train.batch_size": args.batch,
                 "train.optimizer": "sgd", "dataset.cache_latents": "memory",
                 "train.prior_loss_weight": 0.5,
                 **({"dataset.reg_path": str(reg)} if reg else {})}
    config = load_config(PRESETS_DIR / "cpu-demo.toml",
                         [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = setup.check_dataset_or_refuse(config)
    sd = setup.load_model(config, device)
    network = setup.build_network(config, sd)
    data = setup.build_training_data(config, report.items, sd, args.batch, True, lambda: None,
                                     setup.reg_items(report))
    optimizer = torch.optim.SGD(list(network.parameters()), lr=1e-3)
    return {"config": config, "sd": sd, "network": network, "data": data,
            "batches": data.batches(), "optimizer": optimizer,
            "ctx": StepContext(device, config.train.mixed_precision), "times": []}


def timed_step(run: dict, step: int) -> float:
    from trainer.step_loss import step_generator, training_loss

    config, ctx = run["config"], run["ctx"]
    sync(ctx.device)
    start = time.perf_counter()
    tb = next(run["batches"])
    loss = training_loss(config, run["sd"], run["network"], tb, slice(0, len(tb.captions)),
                         step_generator(config.train.seed, step, 0), False, ctx)
    loss.backward()
    run["optimizer"].step()
    run["optimizer"].zero_grad(set_to_none=True)
    sync(ctx.device)
    return time.perf_counter() - start


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
            timed_step(run, 0)
        for step in range(1, args.steps + 1):
            for run in runs.values():
                run["times"].append(timed_step(run, step))
    print("| reg images | median s/step | samples/epoch | steps/epoch | s/epoch |")
    print("|---|---|---|---|---|")
    for name, run in runs.items():
        median = statistics.median(run["times"])
        data = run["data"]
        print(f"| {name} | {median:.4f} | {data.sampler.samples_per_epoch} | {len(data)} | "
              f"{median * len(data):.2f} |")


if __name__ == "__main__":
    main()
