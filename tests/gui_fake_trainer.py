"""A stand-in for `python -m trainer train` in GUI tests: the same arguments,
files, messages, stop/resume and exit statuses, without a model, in
milliseconds per step. FAKE_TRAINER_MODE picks how it ends:

- ok (default): trains train.steps steps and writes the adapter;
- error: one `error: ...` paragraph after a progress-bar fragment, exit 2;
- crash: killed by SIGKILL after the first step (as by the OOM killer);
- oom: a Python traceback ending in an out-of-memory error, exit 1.
FAKE_STEP_SECONDS sets the time per step (default 0.05). Like the real
trainer it holds the run folder's lock, keeps status.json and saves complete
states as `state/state-<step>` (every train.save_state_every_n_steps, and
when it stops or finishes).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import struct
import sys
import time
from pathlib import Path

from core import run_lock
from core.errors import UserError
from trainer.config import load_config, output_dir

STOP = {"requested": False}
STATUS_EVERY_S = 1.0


def bar(step: int, total: int) -> str:
    percent = 100 * step // total
    return f"\rtraining: {percent:3d}%|{'#' * (percent // 10):<10}| {step}/{total} [00:01<00:01]"


def write_adapter(path: Path, name: str) -> None:
    """A tiny but valid kohya LoRA file: one module, float16 zeros."""
    module = "lora_unet_down_blocks_0_attentions_0_proj_in"
    tensors = {f"{module}.lora_down.weight": ("F16", [2, 4]),
               f"{module}.lora_up.weight": ("F16", [4, 2]), f"{module}.alpha": ("F16", [])}
    header, offset = {}, 0
    for key, (dtype, shape) in tensors.items():
        size = 2 * max(1, shape[0] * shape[1] if shape else 1)
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"modelspec.architecture": "stable-diffusion-v1/lora",
                              "modelspec.title": name, "sshs_model_hash": "x"}
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + bytes(offset))


def save_state(folder: Path, step: int) -> None:
    """A complete state appears at once, as the trainer's rename makes it."""
    root = folder / "state"
    staging = root / f".staging-{step:08d}"
    staging.mkdir(parents=True, exist_ok=True)
    (staging / "progress.json").write_text(json.dumps({"step": step}))
    staging.rename(root / f"state-{step:08d}")


def newest_state(folder: Path) -> int | None:
    steps = [int(p.name.split("-")[1]) for p in (folder / "state").glob("state-*")]
    return max(steps, default=None)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("command")
    parser.add_argument("config")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    config = load_config(args.config, args.set)
    folder = output_dir(config)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: STOP.update(requested=True))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with run_lock.RunLock(folder):
            return train(config, args.resume, folder)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def fail(folder: Path, step: int, total: int, message: str) -> UserError:
    run_lock.write_status(folder, run_lock.FAILED, step, total, error=message)
    return UserError(message)


def train(config, resume: bool, folder: Path) -> int:
    mode = os.environ.get("FAKE_TRAINER_MODE", "ok")
    seconds = float(os.environ.get("FAKE_STEP_SECONDS", "0.05"))
    total = config.train.steps
    step = 0
    if resume:
        step = newest_state(folder)
        if step is None:
            raise fail(folder, 0, total, f"--resume: no saved training state in "
                                         f"{folder / 'state'}; start without --resume.")
        if step >= total:  # refused before anything changes, status.json included
            raise UserError(f"--resume: the run in {folder} is already finished: its newest "
                            f"state is at step {step} of {total}. Nothing was changed.")
    run_lock.write_status(folder, run_lock.STARTING, 0, total)
    metrics = folder / "metrics.jsonl"
    kept = [line for line in (metrics.read_text().splitlines() if metrics.exists() else [])
            if resume and json.loads(line)["step"] <= step]
    tmp = metrics.with_suffix(".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    tmp.replace(metrics)  # a new inode, as the trainer's atomic rewrite
    print("Caching latents: 100%|##########| 9/9", file=sys.stderr, flush=True)
    if mode == "error":
        print(bar(1, total), end="", file=sys.stderr, flush=True)
        raise fail(folder, step, total, f"dataset.path = {config.dataset.path} has no usable "
                                        "image;\nfix the dataset and start again.")
    state_every = config.train.save_state_every_n_steps or config.output.save_every_n_steps
    status_at = 0.0
    while step < total:
        time.sleep(seconds)
        step += 1
        one_step(config, folder, metrics, step, total, seconds)
        if state_every and step % state_every == 0:
            save_state(folder, step)
        if time.monotonic() - status_at >= STATUS_EVERY_S:  # as often as the trainer's
            run_lock.write_status(folder, run_lock.TRAINING, step, total)
            status_at = time.monotonic()
        if mode == "crash":
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "oom":
            run_lock.write_status(folder, run_lock.FAILED, step, total, error="out of memory")
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if STOP["requested"] and step < total:
            save_state(folder, step)
            run_lock.write_status(folder, run_lock.STOPPED, step, total)
            print(f"\nstopped after step {step}; the state is saved: continue with --resume")
            return 0
    final = folder / f"{config.output.name}.safetensors"
    write_adapter(final, config.output.name)
    if newest_state(folder) != step:
        save_state(folder, step)
    run_lock.write_status(folder, run_lock.DONE, step, total, files={"final": str(final)})
    print(f"\ndone: {step} steps, adapter written to {final}")
    return 0


def one_step(config, folder: Path, metrics: Path, step: int, total: int, seconds: float):
    with open(metrics, "a") as file:
        file.write(json.dumps({"step": step, "loss": 1.0 / step, "lr": 1e-3, "it_s": 20.0,
                               "eta_s": (total - step) * seconds, "epoch": 0}) + "\n")
    print(bar(step, total), end="", file=sys.stderr, flush=True)
    every = config.sample.every_n_steps
    if every and step % every == 0:
        from PIL import Image

        (folder / "samples").mkdir(exist_ok=True)
        Image.new("RGB", (8, 8), (step * 10 % 255, 0, 0)).save(
            folder / "samples" / f"step{step:06d}-0.png")


if __name__ == "__main__":
    sys.exit(main())
