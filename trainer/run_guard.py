"""One run's hold on its output folder, from the lock to the last status.

The main process takes the folder's lock (core/run_lock.py) before it
writes anything there, clears what killed saves left behind, keeps
`status.json` current and, however the run ends (done, stopped, a UserError,
a bug, Ctrl-C during start-up), says so there and lets the lock go. Other
processes of a data-parallel run never take it: `take` is main-only.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from core.errors import UserError
from core.run_lock import DONE, FAILED, STARTING, STOPPED, TRAINING, RunLock, write_status
from trainer.state import latest_progress

# status.json while training: often enough for a progress bar, rare enough
# that rewriting it costs nothing measurable (it is not fsynced while
# training: core/run_lock.py write_status).
STATUS_EVERY_S = 1.0


class RunAlreadyFinished(UserError):
    """`--resume` of a run that has trained all its steps: nothing to do."""


def resume_point(state_root: Path, total: int, epochs: int = 0) -> int:
    """The step `--resume` continues from, refusing before anything changes
    when there is no state or the run is already finished."""
    found = latest_progress(state_root)
    if found is None:
        raise UserError(
            f"--resume: no saved training state in {state_root}; start without --resume."
        )
    state, progress = found
    if progress.step < total:
        return progress.step
    step = progress.step
    if epochs:
        unit = f" ({epochs} epochs)"
        advice = (f"raise train.epochs above {epochs} (or set train.steps above {step} and "
                  "train.epochs = 0)")
    else:
        unit, advice = "", f"raise train.steps above {step} (e.g. --set train.steps={2 * step})"
    raise RunAlreadyFinished(
        f"--resume: the run in {state_root.parent} is already finished: its newest state "
        f"({state.name}) is at step {step} of {total}{unit}. Nothing was changed. To train it "
        f"further, {advice} and resume again."
    )


class RunGuard:
    def __init__(self, oom_retries: list[dict] | None = None):
        # This process's retries after out of memory (trainer/oom_retry.py),
        # shared with the retry loop, which adds to it: status.json lists them.
        self._oom_retries = oom_retries if oom_retries is not None else []
        self._lock: RunLock | None = None
        self._outputs = None  # trainer.run_outputs.RunOutputs
        self._step = self._total = 0
        self._written_at = 0.0
        self._ended = DONE
        self._closing: list = []

    def take(self, outputs) -> None:
        """Lock the run folder (refusing if another trainer holds it)."""
        self._lock = RunLock(outputs.folder).acquire()
        self._outputs = outputs

    def starting(self, step: int, total: int) -> None:
        """The checks passed and the model loads next: from here on the run is ours."""
        if self._lock is None:
            return
        self._outputs.remove_leftovers()
        self._step, self._total = step, total
        self._write(STARTING)

    def training(self, step: int, force: bool = False) -> None:
        if self._lock is None:
            return
        self._step = step
        if force or time.monotonic() - self._written_at >= STATUS_EVERY_S:
            self._write(TRAINING)

    def close_on_exit(self, thing):
        """`thing.close()` however the run ends: a progress bar left open would
        print itself after the error message."""
        self._closing.append(thing)
        return thing

    def ended(self, stopped_early: bool, step: int) -> None:
        self._ended, self._step = (STOPPED if stopped_early else DONE), step

    def __enter__(self) -> RunGuard:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for thing in reversed(self._closing):
            with contextlib.suppress(Exception):
                thing.close()
        if self._lock is None:
            return
        try:
            if exc is not None:
                with contextlib.suppress(Exception):
                    self._outputs.close()  # flush what TensorBoard has of the steps done
            if isinstance(exc, RunAlreadyFinished):
                pass  # it stays as the finished run left it
            elif exc is None:
                self._write(self._ended)
            elif isinstance(exc, KeyboardInterrupt):  # a signal during start-up
                self._write(STOPPED)
            elif _retrying(exc, self._oom_retries):  # this process trains on: not final
                self._write(TRAINING)
            else:
                self._write(FAILED, error=one_line(exc))
        finally:
            self._lock.release()

    def _write(self, state: str, error: str = "") -> None:
        # Best effort: the status only informs the GUI. A full disk that makes
        # it fail is reported by the save that matters, and must not hide the
        # error a failed run is being closed for.
        files = self._outputs.files() if state != STARTING else {}
        extra = {"extra": {"oom_retries": list(self._oom_retries)}} if self._oom_retries else {}
        with contextlib.suppress(UserError, OSError):
            write_status(self._outputs.folder, state, self._step, self._total, error, files,
                         **extra)
        self._written_at = time.monotonic()


def _retrying(exc: BaseException, oom_retries: list[dict]) -> bool:
    from trainer.oom import OutOfMemoryStop
    from trainer.oom_retry import settle

    return isinstance(exc, OutOfMemoryStop) and settle(exc, oom_retries)


def one_line(exc: BaseException) -> str:
    """A UserError's message as is; a bug's type and first line."""
    if isinstance(exc, UserError):
        return str(exc)
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
