"""`python -m trainer extract --base A --tuned B --rank N --out OUT.safetensors`.

Prints one line per module (its rank and relative Frobenius error), what was
left out and why, and last `wrote: PATH` (the GUI's Tools tab reads it);
with `--json` one JSON line instead of the text lines, then `wrote: PATH`.
Progress lines go to stderr (`core.tool_progress`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

COMMAND = "extract"
HELP = "extract a LoRA approximating the difference between a fine-tune and its base"
DESCRIPTION = (
    "For every layer a LoRA adapts, the best rank-N approximation (SVD) of tuned - base, "
    "saved as a LoRA (with --conv-rank a LoCon: the 3x3 conv layers too) with alpha = rank, "
    "so weight 1 adds the approximation. The text encoder is extracted only when it changed "
    "by more than --min-diff, as kohya's extract_lora_from_models.py does."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, metavar="A",
                        help="the original model (.safetensors checkpoint or diffusers folder)")
    parser.add_argument("--tuned", required=True, metavar="B",
                        help="the fine-tuned model; the LoRA approximates B - A")
    parser.add_argument("--rank", type=int, required=True, metavar="N",
                        help="rank of the Linear and 1x1 conv modules, e.g. 32")
    parser.add_argument("--conv-rank", type=int, metavar="M",
                        help="also extract the 3x3 conv layers at rank M (a LoCon file)")
    parser.add_argument(
        "--min-diff", type=float, default=0.01, metavar="EPS",
        help="extract the text encoder only if some weight changed by more than EPS "
             "(default 0.01, kohya's)",
    )  # fmt: skip
    parser.add_argument("--out", required=True, metavar="OUT.safetensors",
                        help="the adapter file to write")
    parser.add_argument("--precision", choices=("fp16", "bf16", "fp32"), default="fp16",
                        help="dtype of the saved factors (default fp16)")
    parser.add_argument("--json", action="store_true", help="one JSON line (for the GUI)")


def run(args: argparse.Namespace) -> None:
    import json

    from trainer.extract import ExtractRequest, extract, summary_lines

    request = ExtractRequest(
        base=Path(args.base).expanduser(),
        tuned=Path(args.tuned).expanduser(),
        rank=args.rank,
        out=Path(args.out).expanduser(),
        conv_rank=args.conv_rank,
        min_diff=args.min_diff,
        precision=args.precision,
    )
    result = extract(request)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print("\n".join(summary_lines(result, request)))
    print(f"wrote: {result.out}")
