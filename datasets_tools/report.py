"""Problems found in a dataset and the report that lists them.

Severity has one meaning everywhere: an *error* must be fixed before training
(we never drop a file the user put in the folder without saying so, and we never
train around it); a *warning* leaves the dataset trainable but the result may
not be what the user expects.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from core.errors import UserError

if TYPE_CHECKING:
    from .buckets import BucketReport
    from .scan import ImageItem

DATASET_PATH = "."  # `Problem.path` of problems about the dataset as a whole


class Severity(StrEnum):
    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True)
class Problem:
    """One line of the report: which file (relative, POSIX style) and why."""

    severity: Severity
    path: str
    reason: str
    code: str  # stable machine-readable kind, e.g. "truncated", "duplicate"

    def format_line(self) -> str:
        return f"{self.severity.value:<8} {printable(self.path)}: {printable(self.reason)}"

    def to_dict(self) -> dict[str, str]:
        return {"severity": self.severity.value, "path": self.path, "reason": self.reason,
                "code": self.code}


def error(code: str, path: str, reason: str) -> Problem:
    return Problem(Severity.ERROR, path, reason, code)


def warning(code: str, path: str, reason: str) -> Problem:
    return Problem(Severity.WARNING, path, reason, code)


def printable(text: str) -> str:
    """Keep a report line on one line and encodable whatever the file name holds.

    File names may contain newlines, control characters or undecodable bytes
    (surrogate escapes on POSIX); printing those raw breaks the one-line format
    or raises UnicodeEncodeError on stdout.
    """
    if text.isprintable():
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text.encode("unicode_escape", "backslashreplace").decode("ascii")


def sort_problems(problems: list[Problem]) -> list[Problem]:
    """Dataset-level lines first, then by path; errors before warnings on a path."""
    return sorted(
        problems,
        key=lambda p: (p.path != DATASET_PATH, p.path, p.severity != Severity.ERROR, p.reason),
    )


@dataclass
class Report:
    """Result of `check_dataset`: what is wrong, and the images that can be trained on."""

    root: str
    resolution: int
    problems: list[Problem] = field(default_factory=list)
    items: list[ImageItem] = field(default_factory=list)  # usable images only
    buckets: BucketReport | None = None

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity is Severity.ERROR]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity is Severity.WARNING]

    @property
    def trainable(self) -> bool:
        return not self.errors and bool(self.items)

    @property
    def samples_per_epoch(self) -> int:
        return sum(item.repeats for item in self.items)

    def raise_if_untrainable(self) -> None:
        """The trainer's gate: refuse an untrainable dataset with the full report."""
        if not self.trainable:
            raise UserError(self.format_text())

    def summary_line(self) -> str:
        n_err, n_warn = len(self.errors), len(self.warnings)
        if self.trainable:
            return (
                f"Trainable: {len(self.items)} images, {self.samples_per_epoch} samples per "
                f"epoch with repeats, {n_warn} warning{'s' if n_warn != 1 else ''}."
            )
        return (
            f"Not trainable: {n_err} error{'s' if n_err != 1 else ''}, "
            f"{n_warn} warning{'s' if n_warn != 1 else ''}. "
            "Fix the errors above and run the check again."
        )

    def format_text(self) -> str:
        lines = [f"Dataset {printable(self.root)} (resolution {self.resolution})"]
        lines += [p.format_line() for p in self.problems]
        if self.buckets is not None and self.items:
            lines.append(self.buckets.format_text())
        lines.append(self.summary_line())
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "resolution": self.resolution,
            "trainable": self.trainable,
            "images": len(self.items),
            "samples_per_epoch": self.samples_per_epoch,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "problems": [p.to_dict() for p in self.problems],
            "buckets": self.buckets.to_dict() if self.buckets is not None else None,
        }

    def to_json(self) -> str:
        # ensure_ascii keeps undecodable file names (lone surrogates) serialisable.
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=True)
