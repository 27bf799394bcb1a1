"""`python -m networks inspect FILE [--json]`.

Exit status: 0 the file loads everywhere, 1 problems found (listed in the
report), 2 the file cannot be read at all (a one-paragraph `error:` line).
"""

from __future__ import annotations

import argparse
import json
import sys

from core.errors import UserError

from .inspect import format_report, inspect_file

EXIT_OK, EXIT_PROBLEMS, EXIT_UNREADABLE = 0, 1, 2


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
        return EXIT_UNREADABLE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(json.dumps(report.as_dict(), indent=2) if args.json else format_report(report))
    return EXIT_PROBLEMS if report.problems else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
