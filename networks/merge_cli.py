"""`python -m networks merge FILE[:WEIGHT] ... --out OUT.safetensors [--rank N]
[--conv-rank N] [--precision fp16|bf16|fp32] [--json]`."""

from __future__ import annotations

import argparse
import json

from core.errors import UserError

from .resize_cli import PRECISIONS, refuse_bad_ranks

COMMAND = "merge"
HELP = "merge several adapter files into one (weighted, exact or by SVD)"
DESCRIPTION = (
    "Write one adapter whose change is the weighted sum of the inputs' (FILE:0.7 weighs a "
    "file by 0.7; FILE alone is weight 1). LoRA/LoCon inputs merge exactly, their ranks "
    "side by side, and a module found in one input only is kept as it is. Modules that "
    "LoHa, LoKr or Tucker inputs share have no exact LoRA form: give --rank N, which "
    "writes every module's weighted sum as its best rank-N approximation (SVD)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE[:WEIGHT]",
                        help="adapter .safetensors files, each with an optional weight")
    parser.add_argument("--out", required=True, help="the .safetensors file to write")
    parser.add_argument("--rank", type=int,
                        help="SVD each module's weighted sum to this rank (else exact)")
    parser.add_argument("--conv-rank", type=int,
                        help="with --rank: the rank of k x k conv modules (default: --rank)")
    parser.add_argument("--precision", choices=PRECISIONS,
                        help="tensor type of the output (default: the first input's)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    refuse_bad_ranks(args)
    if args.conv_rank is not None and args.rank is None:
        raise UserError("--conv-rank goes with --rank (an exact merge keeps every rank).")
    from .merge_files import MergePlan, merge_files, parse_source
    from .resize import use_tool_threads

    use_tool_threads()

    inputs = [parse_source(text) for text in args.files]
    plan = MergePlan(args.rank, args.conv_rank, args.precision)
    result = merge_files(inputs, args.out, plan)
    print(json.dumps(result.as_dict(), indent=2) if args.json else format_result(result))
    return 0


def format_result(result) -> str:
    s = result.summary
    lines = ["Inputs: " + ", ".join(f"{i['path']} x{i['weight']:g}" for i in s["inputs"])]
    lines.append(f"Modules: {s['modules']} (" + ", ".join(
        f"{mode} {n}" for mode, n in s["modes"].items()) + ")")
    ranks = sorted({m.rank for m in result.modules})
    lines.append("Ranks: " + ", ".join(map(str, ranks)))
    if "svd" in s["modes"]:
        lines.append(f"Kept Frobenius fraction: mean {s['mean_kept_fraction']:.2%}, "
                     f"min {s['min_kept_fraction']:.2%}.")
    lines.append(f"Size: {s['size_after']:,} bytes, {s['precision']}")
    lines.append(f"wrote: {result.out}")
    return "\n".join(lines)
