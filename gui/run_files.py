"""Reading what a training run writes while it runs: its metrics (where the
files are: core/run_layout.py) and the log, cheaply enough to do every second."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

_TQDM_TOTAL = re.compile(r"training:\s*\d+%\|[^|]*\|\s*(\d+)/(\d+)")
LOG_TAIL_BYTES = 64 * 1024


@dataclass(frozen=True)
class Metric:
    step: int
    loss: float
    lr: float
    it_s: float
    eta_s: float
    epoch: int


@dataclass(frozen=True)
class ValidationPoint:
    step: int
    val_loss: float


class MetricsReader:
    """Incremental reader of one metrics.jsonl.

    The trainer appends one line per step, and rewrites the file (a new inode,
    through os.replace) when a run starts or resumes; a rewrite is read anew.
    """

    def __init__(self, path: Path):
        self.path = path
        self.rows: list[Metric] = []
        self.validation: list[ValidationPoint] = []  # the val_loss lines (trainer/validation.py)
        self._inode: int | None = None
        self._offset = 0

    def read(self) -> list[Metric]:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self.rows, self.validation, self._inode, self._offset = [], [], None, 0
            return self.rows
        if stat.st_ino != self._inode or stat.st_size < self._offset:
            self.rows, self.validation, self._inode, self._offset = [], [], stat.st_ino, 0
        if stat.st_size == self._offset:
            return self.rows
        with open(self.path, "rb") as file:
            file.seek(self._offset)
            chunk = file.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line being written waits
        self._offset += len(complete)
        for line in complete.decode("utf-8", "replace").splitlines():
            if line.strip() and (metric := _metric(line)) is not None:
                rows = self.validation if isinstance(metric, ValidationPoint) else self.rows
                rows.append(metric)
        return self.rows


def _metric(line: str) -> Metric | None:
    """One line's metric; a line that is not one (a disk that filled up
    mid-line, a file edited by hand) is left out rather than stopping the view."""
    try:
        return _from_record(json.loads(line))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _from_record(record: dict) -> Metric | ValidationPoint:
    if "loss" not in record and "val_loss" in record:
        return ValidationPoint(int(record["step"]), float(record["val_loss"]))
    return Metric(
        step=int(record["step"]), loss=float(record.get("loss", float("nan"))),
        lr=float(record.get("lr", 0.0)), it_s=float(record.get("it_s", 0.0)),
        eta_s=float(record.get("eta_s", 0.0)), epoch=int(record.get("epoch", 0)),
    )  # fmt: skip


def best_validation(path: Path) -> str:
    """'best: step N (file)' from a run's validation.json; '' without one."""
    try:
        record = json.loads(path.read_text())
        step, loss, file = record["best_step"], record["best_val_loss"], record.get("best_file")
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    return f"Validation best: step {step} (loss {loss:.4f}, {file or 'no file saved at that step'})"


def read_tail(path: Path, size: int = LOG_TAIL_BYTES) -> str:
    """The end of a log file; '' if it does not exist yet."""
    try:
        with open(path, "rb") as file:
            file.seek(max(0, os.fstat(file.fileno()).st_size - size))
            return file.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def log_lines(text: str, limit: int = 40) -> list[str]:
    """Lines as a terminal would show them: a '\\r' redraw replaces the line."""
    lines = []
    for raw in text.replace("\r\n", "\n").split("\n"):
        shown = raw.split("\r")
        visible = next((part for part in reversed(shown) if part.strip()), "")
        lines.append(visible)
    while lines and not lines[-1].strip():
        lines.pop()
    return lines[-limit:]


def tqdm_total(text: str) -> int | None:
    """The step count the trainer's progress bar shows (known with train.epochs too)."""
    matches = _TQDM_TOTAL.findall(text)
    return int(matches[-1][1]) if matches else None


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
