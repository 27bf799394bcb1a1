"""`python -m networks inspect FILE [--json]`."""

from __future__ import annotations

import argparse
import json
import sys

from trainer.errors import UserError

from .inspect import format_report, inspect_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m networks")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="describe an adapter file and flag problems")
    inspect.add_argument("file")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    try:
        report = inspect_file(args.file)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report.as_dict(), indent=2) if args.json else format_report(report))
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
