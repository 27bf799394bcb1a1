"""A stand-in for `python -m trainer train` in GUI tests: the same arguments,
files, messages, stop/resume and exit statuses, without a model, in
milliseconds per step. FAKE_TRAINER_MODE picks how it ends:

- ok (default): trains train.steps steps and writes the adapter;
- error: one `error: ...` paragraph after a progress-bar fragment, exit 2;
- crash: killed by SIGKILL after the first step (as by the OOM killer);
- oom: a Python traceback ending in an out-of-memory error, exit 1.
FAKE_STEP_SECONDS sets the time per step (default 0.05).
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

from trainer.config import load_config, output_dir

STOP = {"requested": False}


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


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("command")
    parser.add_argument("config")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    config = load_config(args.config, args.set)
    mode = os.environ.get("FAKE_TRAINER_MODE", "ok")
    seconds = float(os.environ.get("FAKE_STEP_SECONDS", "0.05"))
    folder = output_dir(config)
    state = folder / "state" / "state.json"
    signal.signal(signal.SIGTERM, lambda *_: STOP.update(requested=True))
    step = 0
    if args.resume:
        if not state.exists():
            print(f"error: --resume: no saved training state in {state.parent}; start without "
                  "--resume.", file=sys.stderr)
            return 2
        step = json.loads(state.read_text())["step"]
    folder.mkdir(parents=True, exist_ok=True)
    metrics = folder / "metrics.jsonl"
    kept = [line for line in (metrics.read_text().splitlines() if metrics.exists() else [])
            if args.resume and json.loads(line)["step"] <= step]
    tmp = metrics.with_suffix(".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    tmp.replace(metrics)  # a new inode, as the trainer's atomic rewrite
    total = config.train.steps
    print("Caching latents: 100%|##########| 9/9", file=sys.stderr, flush=True)
    if mode == "error":
        print(bar(1, total), end="", file=sys.stderr, flush=True)
        print(f"error: dataset.path = {config.dataset.path} has no usable image;\n"
              "fix the dataset and start again.", file=sys.stderr)
        return 2
    while step < total:
        time.sleep(seconds)
        step += 1
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
        if mode == "crash":
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "oom":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if STOP["requested"] and step < total:
            state.parent.mkdir(exist_ok=True)
            state.write_text(json.dumps({"step": step}))
            print(f"\nstopped after step {step}; the state is saved: continue with --resume")
            return 0
    final = folder / f"{config.output.name}.safetensors"
    write_adapter(final, config.output.name)
    state.parent.mkdir(exist_ok=True)
    state.write_text(json.dumps({"step": step}))
    print(f"\ndone: {step} steps, adapter written to {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
