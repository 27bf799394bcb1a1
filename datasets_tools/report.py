"""Problems found in a dataset and the report that lists them.

Severity has one meaning everywhere: an *error* is about the dataset as a
whole (no folder, no usable image) and must be fixed before training; a file
that cannot be used (corrupt, unsupported, too small, an unreadable caption) is
*skipped*: training goes on without it and every report lists it, so no file
the user put in the folder is dropped silently (with `strict`, any skipped file
makes the dataset untrainable); a *warning* leaves the dataset trainable but
the result may not be what the user expects.
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
    SKIPPED = "skipped"
    WARNING = "warning"


_RANK = {Severity.ERROR: 0, Severity.SKIPPED: 1, Severity.WARNING: 2}


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


def skipped(code: str, path: str, reason: str) -> Problem:
    return Problem(Severity.SKIPPED, path, reason, code)


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
    """Dataset-level lines first, then by path; errors, skips, warnings on a path."""
    return sorted(
        problems,
        key=lambda p: (p.path != DATASET_PATH, p.path, _RANK[p.severity], p.reason),
    )


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'s' if n != 1 else ''}"


@dataclass
class Report:
    """Result of `check_dataset`: what is wrong, and the images that can be trained on."""

    root: str
    resolution: int
    problems: list[Problem] = field(default_factory=list)
    items: list[ImageItem] = field(default_factory=list)  # usable images only
    buckets: BucketReport | None = None
    strict: bool = False  # a skipped file makes the dataset untrainable
    reg: Report | None = None  # the check of dataset.reg_path, when the run has one

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity is Severity.ERROR]

    @property
    def skipped(self) -> list[Problem]:
        """The files training leaves out, each with why."""
        return [p for p in self.problems if p.severity is Severity.SKIPPED]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity is Severity.WARNING]

    @property
    def trainable(self) -> bool:
        return not self.errors and bool(self.items) and not (self.strict and self.skipped)

    @property
    def samples_per_epoch(self) -> int:
        return sum(item.repeats for item in self.items)

    def raise_if_untrainable(self) -> None:
        """The trainer's gate: refuse an untrainable dataset with the full report."""
        if not self.trainable:
            raise UserError(self.format_text())

    def skipped_text(self) -> str:
        """'N files skipped' and one indented line per file with why; '' for none."""
        if not self.skipped:
            return ""
        lines = [f"{_count(len(self.skipped), 'file')} skipped (not trained on):"]
        lines += [f"  {printable(p.path)}: {printable(p.reason)}" for p in self.skipped]
        return "\n".join(lines)

    def summary_line(self) -> str:
        n_err, n_skip, n_warn = len(self.errors), len(self.skipped), len(self.warnings)
        warnings = _count(n_warn, "warning")
        if self.trainable:
            skips = f", {_count(n_skip, 'file')} skipped" if n_skip else ""
            return (
                f"Trainable: {len(self.items)} images, {self.samples_per_epoch} samples per "
                f"epoch with repeats{skips}, {warnings}."
            )
        if not n_err:  # only strict refuses a dataset without errors
            return (
                f"Not trainable with strict checking (--strict, dataset.strict = true): "
                f"{_count(n_skip, 'file')} would be skipped (listed above). Fix or remove them, "
                "or check without strict to train on the rest."
            )
        return (
            f"Not trainable: {_count(n_err, 'error')}, {warnings}. "
            "Fix the errors above and run the check again."
        )

    def format_text(self) -> str:
        lines = [f"Dataset {printable(self.root)} (resolution {self.resolution})"]
        lines += [p.format_line() for p in self.problems if p.severity is not Severity.SKIPPED]
        if self.skipped:
            lines.append(self.skipped_text())
        if self.buckets is not None and self.items:
            lines.append(self.buckets.format_text())
        lines.append(self.summary_line())
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "resolution": self.resolution,
            "trainable": self.trainable,
            "strict": self.strict,
            "images": len(self.items),
            "samples_per_epoch": self.samples_per_epoch,
            "errors": len(self.errors),
            "skipped": len(self.skipped),
            "warnings": len(self.warnings),
            "problems": [p.to_dict() for p in self.problems],
            "buckets": self.buckets.to_dict() if self.buckets is not None else None,
        }

    def to_json(self) -> str:
        # ensure_ascii keeps undecodable file names (lone surrogates) serialisable.
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=True)
