"""The memory estimate (`python -m trainer estimate`) against the measured peak
of real short training runs on the CPU.

Each run is a child process: it imports everything the run uses, reads its
resident memory (the idle process), resets the kernel's high-water mark
(/proc/self/clear_refs), trains a few steps, and reports the high-water mark
above the idle RSS. The estimate's `run_bytes` is the same quantity.

    nice -n 10 python -m bench.memory_estimate            # demo configs + SD1.5 256 px
    nice -n 10 python -m bench.memory_estimate --demo-only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_BASE = ["model.path=demo", "dataset.path=demo", "dataset.buckets=false",
             "network.train_text_encoder=false", "network.rank=4", "network.alpha=4",
             "sample.every_n_steps=0", "train.steps=3"]  # fmt: skip
# Configs that differ in what dominates: fixed costs, activations, checkpointing,
# a trained text encoder with latents encoded at every step.
DEMO_CONFIGS = {
    "demo 64 px, batch 1": ["dataset.resolution=64", "train.batch_size=1"],
    "demo 256 px, batch 4": ["dataset.resolution=256", "train.batch_size=4"],
    "demo 256 px, batch 4, checkpointing": ["dataset.resolution=256", "train.batch_size=4",
                                            "train.gradient_checkpointing=true"],
    "demo 256 px, batch 2, text encoder trained, latents uncached": [
        "dataset.resolution=256", "train.batch_size=2", "network.train_text_encoder=true",
        "dataset.cache_latents=off"],
    "demo 192 px, batch 8, bf16": ["dataset.resolution=192", "train.batch_size=8",
                                   "train.mixed_precision=bf16"],
}


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _child(overrides: list[str]) -> None:
    """Run in the child: imports, idle RSS, reset the peak, train, print JSON."""
    import diffusers.optimization  # noqa: F401
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

    import datasets_tools.check  # noqa: F401  everything the run imports, before the idle RSS
    import datasets_tools.latent_cache  # noqa: F401
    import datasets_tools.training_data  # noqa: F401
    import networks.export  # noqa: F401
    import networks.network  # noqa: F401
    import trainer.model_loading  # noqa: F401
    import trainer.optim  # noqa: F401
    import trainer.train
    from trainer.config import load_config

    config = load_config(None, overrides)
    idle = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS now
    started = time.perf_counter()
    trainer.train.run(config)
    print(json.dumps({"idle": idle, "peak_above_idle": _status("VmHWM") - idle,
                      "seconds": time.perf_counter() - started}))


def measure(overrides: list[str], workdir: Path) -> dict:
    """The measured peak of a short run in a child process."""
    out = workdir / f"out-{time.monotonic_ns()}"
    command = [sys.executable, "-m", "bench.memory_estimate", "--child",
               *overrides, f"output.dir={out}"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"the measured run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def estimated(overrides: list[str]) -> int:
    from trainer.config import load_config
    from trainer.estimate import estimate

    return estimate(load_config(None, overrides), device="cpu", with_advice=False).run_bytes


def sd15_folder(workdir: Path) -> Path:
    from bench.train_step import build_model_folder

    return build_model_folder(workdir)


def sd15_config(workdir: Path) -> list[str]:
    from bench.train_step import make_dataset

    data = make_dataset(workdir, 256, 4)
    return [f"model.path={sd15_folder(workdir)}", f"dataset.path={data}",
            "dataset.resolution=256", "dataset.buckets=false", "network.rank=16",
            "network.alpha=16", "network.train_text_encoder=false", "train.batch_size=1",
            "train.steps=2", "sample.every_n_steps=0"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--demo-only", action="store_true")
    parser.add_argument("--workdir", type=Path,
                        default=Path(tempfile.gettempdir()) / "bench-memory")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    configs = {name: DEMO_BASE + extra for name, extra in DEMO_CONFIGS.items()}
    if not args.demo_only:
        configs["SD1.5 architecture, 256 px, batch 1, LoRA r16"] = sd15_config(args.workdir)
    print("| config | estimate | measured peak above idle | estimate / measured |")
    print("|---|---|---|---|")
    for name, overrides in configs.items():
        guess, real = estimated(overrides), measure(overrides, args.workdir)["peak_above_idle"]
        print(f"| {name} | {guess / 2**20:.0f} MiB | {real / 2**20:.0f} MiB | "
              f"{guess / real:.2f} |", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        _child(sys.argv[2:])
    else:
        main()
