"""What one validation evaluation costs (trainer/validation.py): the loss of N
held-out images at VALIDATION_TIMESTEPS fixed timesteps each, on the demo
model at the cpu-demo settings, next to one training step of the same run
(training_loss + backward + optimizer step, batch train.batch_size) so the
cost reads as "an evaluation = k steps".

Latents are cached first (once per run, as the trainer does; reported
apart); each evaluation is then timed `--repeats` times and the median kept.
The training steps are timed interleaved with the evaluations, so drift on a
shared CPU hits both alike.

    python -m bench.validation_cost [--images 2 4 8] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bench.demo_step import run_parts, timed_step


def setup_run(count: int):
    from trainer.config import PRESETS_DIR, load_config
    from trainer.step_loss import frozen_text_cache

    config = load_config(PRESETS_DIR / "cpu-demo.toml", ["dataset.validation_split=0.5"])
    report, sd, network, data, ctx = run_parts(config, config.train.batch_size)
    ctx.text_cache = frozen_text_cache(config, sd)  # as the run, with the text encoder frozen
    items = (report.items * count)[:count]  # the demo has 9 images: repeat them for more
    return config, sd, network, ctx, data, items


def measure(count: int, repeats: int) -> dict:
    from trainer.validation import VALIDATION_TIMESTEPS, Validator

    config, sd, network, ctx, data, items = setup_run(count)
    start = time.perf_counter()
    validator = Validator(config, items, sd)
    caching = time.perf_counter() - start
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-6)
    tb = next(iter(data.batches()))
    network.train()
    validator.loss(config, sd, network, ctx)  # warm-up: first calls allocate
    evaluations, steps = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        validator.loss(config, sd, network, ctx)
        evaluations.append(time.perf_counter() - start)
        steps.append(timed_step(config, sd, network, lambda: tb, optimizer, ctx))
    evaluation, step = statistics.median(evaluations), statistics.median(steps)
    network.detach()
    return {"images": count, "timesteps_per_image": VALIDATION_TIMESTEPS,
            "evaluation_s": round(evaluation, 4), "per_image_s": round(evaluation / count, 4),
            "train_step_s": round(step, 4), "steps_per_evaluation": round(evaluation / step, 2),
            "latent_caching_s": round(caching, 3), "repeats": repeats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(count, args.repeats) for count in args.images]
    print(json.dumps(rows, indent=1))
    print("\n| validation images | evaluation (s) | per image (s) | training step (s) | "
          "evaluation / step | latent caching (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['images']} | {r['evaluation_s']} | {r['per_image_s']} | "
              f"{r['train_step_s']} | {r['steps_per_evaluation']} | {r['latent_caching_s']} |")


if __name__ == "__main__":
    main()
