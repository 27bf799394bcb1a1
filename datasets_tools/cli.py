"""`python -m datasets_tools check DIR [--json]`: the dataset report on the command line.

Exit status: 0 trainable (warnings and skipped files allowed: the report lists
"N files skipped" and why), 1 not trainable (no usable image, or with --strict
any skipped file), 2 invalid options or a folder that is not a dataset (a
system folder, or past the scan limits).
No traceback reaches the user: bad content becomes report lines, bad options a
one-line message.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from core.errors import UserError

from .buckets import BucketConfig
from .check import check_dataset
from .scan import ScanLimits

EXIT_TRAINABLE, EXIT_NOT_TRAINABLE, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m datasets_tools")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="list every problem in a dataset folder")
    check.add_argument("directory", help="dataset folder (searched recursively)")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.add_argument("--resolution", type=int, default=512)
    check.add_argument("--no-buckets", action="store_true",
                       help="fixed resolution x resolution crops instead of aspect buckets")
    check.add_argument("--bucket-step", type=int, default=64)
    check.add_argument("--min-bucket", type=int, default=256, help="smallest bucket side")
    check.add_argument("--max-bucket", type=int, default=1024, help="largest bucket side")
    check.add_argument("--no-upscale", action="store_true",
                       help="give small images a bucket of their own size instead of enlarging")
    check.add_argument("--caption-extension", default=".txt")
    check.add_argument("--strict", action="store_true",
                       help="not trainable if any file would be skipped (dataset.strict)")
    check.add_argument("--repeats", type=int, default=1,
                       help='repeats of images outside kohya "N_name" folders (dataset.repeats)')
    check.add_argument("--masked-loss", action="store_true",
                       help="also check each image's loss mask (dataset.masked_loss)")
    check.add_argument("--mask-path", default=None,
                       help="folder of masks named like the images (dataset.mask_path); "
                            "without it masks come from the alpha channel")
    defaults = ScanLimits()
    check.add_argument("--max-depth", type=int, default=defaults.max_depth,
                       help="subfolder levels searched below DIR")
    check.add_argument("--max-entries", type=int, default=defaults.max_entries,
                       help="files and folders looked at before the scan stops")
    check.add_argument("--max-seconds", type=float, default=defaults.max_seconds,
                       help="time the folder walk may take")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = BucketConfig(
            resolution=args.resolution, enabled=not args.no_buckets, step=args.bucket_step,
            min_side=args.min_bucket, max_side=args.max_bucket, no_upscale=args.no_upscale,
        )
        limits = ScanLimits(args.max_depth, args.max_entries, args.max_seconds)
        report = check_dataset(args.directory, config, caption_extension=args.caption_extension,
                               progress=not args.json and sys.stderr.isatty(), limits=limits,
                               repeats=args.repeats, strict=args.strict,
                               masked_loss=args.masked_loss or args.mask_path is not None,
                               mask_dir=args.mask_path)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(report.to_json() if args.json else report.format_text())
    return EXIT_TRAINABLE if report.trainable else EXIT_NOT_TRAINABLE
