"""`python -m networks resize FILE (--rank N | --dynamic METHOD --value X [--rank N])
--out OUT.safetensors [--conv-rank N] [--precision fp16|bf16|fp32] [--json]`."""

from __future__ import annotations

import argparse
import json

from core.errors import UserError

COMMAND = "resize"
HELP = "change an adapter file's rank (SVD), fixed or dynamic per module"
DESCRIPTION = (
    "Write FILE at another rank: each module's delta is truncated by SVD (the closest "
    "delta at that rank) and written as LoRA/LoCon; LoHa and LoKr files become LoRA/LoCon. "
    "--rank N for a fixed rank, or --dynamic with --value for kohya's per-module rules "
    "(sv_ratio: keep singular values within 1/X of the largest; sv_cumulative: a fraction X "
    "of their sum; sv_fro: a fraction X of the Frobenius norm), --rank then being the "
    "largest rank allowed. Alpha keeps the input's alpha/rank ratio, as kohya's resize."
)
METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")
PRECISIONS = ("fp16", "bf16", "fp32")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="the adapter .safetensors file to resize")
    parser.add_argument("--rank", type=int, help="the new rank (with --dynamic: the largest)")
    parser.add_argument("--conv-rank", type=int,
                        help="the rank of k x k conv modules (default: as --rank)")
    parser.add_argument("--dynamic", choices=METHODS, help="pick each module's rank by rule")
    parser.add_argument("--value", type=float, help="the --dynamic rule's parameter")
    parser.add_argument("--out", required=True, help="the .safetensors file to write")
    parser.add_argument("--precision", choices=PRECISIONS,
                        help="tensor type of the output (default: the input's)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def refuse_bad_ranks(args: argparse.Namespace) -> None:
    """--rank and --conv-rank, where given, are at least 1 (resize and merge)."""
    for name in ("rank", "conv_rank"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} {value}: a rank is at least 1.")


def check_arguments(args: argparse.Namespace) -> None:
    """What argparse cannot say, as UserErrors naming the argument."""
    refuse_bad_ranks(args)
    if args.dynamic is None:
        if args.rank is None:
            raise UserError("resize needs --rank N (a fixed rank) or --dynamic METHOD "
                            "--value X (a rank per module).")
        if args.value is not None:
            raise UserError("--value is the parameter of --dynamic; give --dynamic too.")
        return
    if args.value is None:
        raise UserError(f"--dynamic {args.dynamic} needs --value X.")
    if args.dynamic == "sv_ratio" and not args.value >= 1:
        raise UserError(f"--dynamic sv_ratio --value {args.value:g}: the ratio of the largest "
                        "singular value to the smallest kept is at least 1 (e.g. 20).")
    if args.dynamic != "sv_ratio" and not 0 < args.value <= 1:
        raise UserError(f"--dynamic {args.dynamic} --value {args.value:g}: the fraction to "
                        "keep is in (0, 1] (e.g. 0.9).")


def run(args: argparse.Namespace) -> int:
    check_arguments(args)
    from .resize import RankRule, resize_file, use_tool_threads

    use_tool_threads()

    rule = RankRule(args.rank, args.conv_rank, args.dynamic, args.value or 0.0)
    result = resize_file(args.file, args.out, rule, args.precision)
    print(json.dumps(result.as_dict(), indent=2) if args.json else format_result(result))
    return 0


def format_result(result) -> str:
    lines = [f"{'module':<80} {'rank':>11} {'kept':>7}"]
    for m in result.modules:
        lines.append(f"{m.name:<80} {m.old_rank:>4} -> {m.new_rank:<4} {m.kept_fraction:>7.2%}")
    s = result.summary
    lines.append(f"Kept Frobenius fraction: mean {s['mean_kept_fraction']:.2%}, "
                 f"min {s['min_kept_fraction']:.2%} over {s['modules']} modules.")
    if s["converted_to_lora"]:
        lines.append(f"{s['converted_to_lora']} LoHa/LoKr modules were written as LoRA/LoCon.")
    lines.append(f"Size: {s['size_before']:,} -> {s['size_after']:,} bytes ({s['precision']}).")
    lines.append(f"wrote: {result.out}")
    return "\n".join(lines)
