"""`python -m networks <verb>`: the tools that work on adapter files.

Each verb is one module (see `core.cli_verbs`) and one line in `VERBS`.
Exit status: 0 done, 1 `inspect` found problems, 2 a one-paragraph
`error:` line (a file that cannot be read, a bad argument), 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys

from core.cli_verbs import add_verbs
from core.errors import UserError

EXIT_UNREADABLE = 2

VERBS = (
    "networks.inspect_cli",
    "networks.resize_cli",
    "networks.merge_cli",
    "networks.convert_cli",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m networks")
    add_verbs(parser.add_subparsers(dest="command", required=True), VERBS)
    args = parser.parse_args(argv)
    try:
        return args.handler(args) or 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNREADABLE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
