"""The progress lines the LoRA tools print and the GUI's Tools tab follows.

A tool (`python -m networks resize`, `python -m trainer merge-into`, ...)
prints `progress: DONE/TOTAL WHAT` on stderr after each unit of work (a
module, a layer), flushed at once so a parent reading the pipe sees it. The
GUI only ever shows the last such line; everything else on stderr keeps its
meaning (`error: ...` is still the one-paragraph failure). Torch-free, so
the GUI can parse what the tools print.
"""

from __future__ import annotations

import re
import sys
from typing import TextIO

PREFIX = "progress: "
_LINE = re.compile(r"^progress: (\d+)/(\d+) ?(.*)$", re.MULTILINE)


def progress_line(done: int, total: int, what: str = "") -> str:
    return f"{PREFIX}{done}/{total} {what}".rstrip()


def report(done: int, total: int, what: str = "", stream: TextIO | None = None) -> None:
    stream = stream or sys.stderr
    print(progress_line(done, total, what), file=stream, flush=True)


def last_progress(text: str) -> tuple[int, int, str] | None:
    """The last progress line in `text` as (done, total, what), or None."""
    matches = list(_LINE.finditer(text))
    if not matches:
        return None
    done, total, what = matches[-1].groups()
    return int(done), int(total), what


def fraction(text: str) -> float | None:
    """How far the tool is, 0..1, from the last progress line in `text`."""
    progress = last_progress(text)
    if progress is None or progress[1] <= 0:
        return None
    return min(1.0, progress[0] / progress[1])
