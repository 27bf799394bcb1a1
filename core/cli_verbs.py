"""One module per command-line verb, one line per verb in its CLI's table.

`python -m networks` and the tool verbs of `python -m trainer` are built from
modules that each define:

- `COMMAND`, `HELP` (one line for the verb list) and `DESCRIPTION`;
- `add_arguments(parser)`, cheap: no torch at import time, so `--help` and
  argument mistakes answer at once;
- `run(args) -> int | None`, the exit status (None is 0). A `UserError`
  raised from it becomes one `error: ...` paragraph and exit status 2.

Adding a verb is one module plus one line in the CLI's verb table.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Iterable


def add_verbs(commands: argparse._SubParsersAction, modules: Iterable[str]) -> None:
    for name in modules:
        module = importlib.import_module(name)
        parser = commands.add_parser(
            module.COMMAND, help=module.HELP, description=module.DESCRIPTION
        )
        module.add_arguments(parser)
        parser.set_defaults(handler=module.run)
