"""`python -m networks inspect FILE [--json]`.

Exit status: 0 the file loads everywhere, 1 problems found (listed in the
report), 2 the file cannot be read at all (a one-paragraph `error:` line).
"""

from __future__ import annotations

import argparse
import json

EXIT_OK, EXIT_PROBLEMS = 0, 1

COMMAND = "inspect"
HELP = "describe an adapter file and flag problems"
DESCRIPTION = "Describe an adapter file (algorithm, ranks, modules, metadata) and flag what "\
    "a loader would refuse or map wrongly. Exit 0: loads everywhere; 1: problems listed."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    from .inspect import format_report, inspect_file

    report = inspect_file(args.file)
    print(json.dumps(report.as_dict(), indent=2) if args.json else format_report(report))
    return EXIT_PROBLEMS if report.problems else EXIT_OK
