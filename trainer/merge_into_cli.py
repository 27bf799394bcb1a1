"""`python -m trainer merge-into --model CKPT --lora FILE[:WEIGHT] ... --out OUT`.

The last stdout line is `wrote: PATH` (the GUI's Tools tab reads it);
progress lines go to stderr (`core.tool_progress`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

COMMAND = "merge-into"
HELP = "bake LoRAs into a base model and write it as a new checkpoint"
DESCRIPTION = (
    "Merge each --lora into --model at its weight, W' = W + weight * scale * delta W (DoRA "
    "files by their own formula), as A1111 and ComfyUI apply them, and write a single-file "
    "checkpoint in the A1111/LDM layout (or with --diffusers a diffusers folder). The merge "
    "is computed in fp32 and cast once to --precision."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, metavar="CKPT",
        help="the base model: an SD 1.x .safetensors checkpoint or a diffusers folder",
    )  # fmt: skip
    parser.add_argument(
        "--lora", action="append", required=True, metavar="FILE[:WEIGHT]",
        help="a LoRA/LyCORIS file merged in at WEIGHT (default 1.0); repeatable",
    )  # fmt: skip
    parser.add_argument(
        "--out", required=True, metavar="MODEL.safetensors",
        help="the checkpoint to write (a folder with --diffusers)",
    )  # fmt: skip
    parser.add_argument(
        "--precision", choices=("fp16", "bf16", "fp32"), default="fp16",
        help="dtype of the written weights (default fp16)",
    )  # fmt: skip
    parser.add_argument(
        "--diffusers", action="store_true", help="write a diffusers folder instead of one file"
    )


def run(args: argparse.Namespace) -> None:
    from trainer.merge_into import MergeRequest, merge_into
    from trainer.sample_cli import parse_adapter

    request = MergeRequest(
        model=Path(args.model).expanduser(),
        adapters=tuple(parse_adapter(text, "--lora") for text in args.lora),
        out=Path(args.out).expanduser(),
        precision=args.precision,
        diffusers=args.diffusers,
    )
    started = time.perf_counter()
    out = merge_into(request)
    merged = ", ".join(f"{path.name} at {weight:g}" for path, weight in request.adapters)
    print(f"merged {merged} into {request.model.name} ({request.precision}, "
          f"{time.perf_counter() - started:.1f} s)")
    print(f"wrote: {out}")
