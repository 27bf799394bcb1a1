"""What `sample.compare` adds per sampling point on the demo model (cpu-demo
preset): the base model's render set, made once per run, and the grid
rewrite, made at every sampling point, for 2, 12 and 30 saved rows.

`python -m bench.compare_cost [--repeats N]`; medians, one torch thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from trainer import train_setup as setup
from trainer.compare_grid import write_compare_grid
from trainer.config import PRESETS_DIR, load_config
from trainer.preview import preview_settings
from trainer.run_outputs import RunOutputs
from trainer.sampling import generate

EVERY = 15  # the cpu-demo preset's sample.every_n_steps


def median_ms(action, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(tempfile.mkdtemp(prefix="bench-compare-"))
    config = load_config(PRESETS_DIR / "cpu-demo.toml",
                         [f"output.dir={json.dumps(str(out))}", "sample.compare=true"])
    sd = setup.load_model(config, torch.device("cpu"))
    settings = preview_settings(config)
    images = generate(sd, settings)  # also the warm-up
    print(f"render set ({len(config.sample.prompts)} prompt, {settings.steps} steps): "
          f"median {median_ms(lambda: generate(sd, settings), args.repeats):.0f} ms")
    outputs = RunOutputs(out, "bench")
    for rows in (2, 12, 30):
        for row in range(1, rows + 1):
            outputs.save_previews(row * EVERY, images)
        step = rows * EVERY
        ms = median_ms(lambda step=step: write_compare_grid(outputs, step, images, EVERY),
                       args.repeats)
        print(f"grid rewrite, {rows} rows saved: median {ms:.1f} ms")


if __name__ == "__main__":
    main()
