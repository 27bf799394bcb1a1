"""What every event handler shares: failures become a message in the page.

A handler returns {component: value} for what it changes. A `UserError` or
an `OSError` (a full disk, a folder without permission) ends the action with
the reason in the tab's status box; anything else is a bug, reported in the
page as one line (the traceback goes to the console, for a bug report).
"""

from __future__ import annotations

import contextlib
import functools
import threading
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import UserError
from gui import views
from gui.datadir import DataDirs
from gui.jobs import JobRunner
from gui.paths import PathRules


class Cancels:
    """The cancel switches of the dataset scans and checks now running, so
    that one Cancel button stops them all (a scan of a huge folder runs in a
    worker thread that Gradio cannot stop)."""

    def __init__(self) -> None:
        self._running: set[threading.Event] = set()
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def running(self) -> Iterator[threading.Event]:
        event = threading.Event()
        with self._lock:
            self._running.add(event)
        try:
            yield event
        finally:
            with self._lock:
                self._running.discard(event)

    def cancel_all(self) -> int:
        """Set every running switch; how many there were."""
        with self._lock:
            events = list(self._running)
        for event in events:
            event.set()
        return len(events)


@dataclass
class Context:
    """What the tabs share: folders, the job runner, the generated form, the
    path rules and the cancel switches."""

    dirs: DataDirs
    runner: JobRunner
    form: dict[str, Any]  # "section.key" -> input component
    tabs: Any = None  # gr.Tabs, to switch tab from a button
    paths: PathRules = field(init=False)
    cancels: Cancels = field(default_factory=Cancels)

    def __post_init__(self) -> None:
        self.paths = PathRules(self.dirs, lambda: [Path(j.output_dir) for j in self.runner.jobs()])


def reports_to(status):
    """Decorate a handler whose failures go to the Markdown `status`."""

    def wrap(fn):
        @functools.wraps(fn)
        def handler(*args, **kwargs):
            import gradio as gr

            try:
                return fn(*args, **kwargs)
            except UserError as error:
                return {status: views.problem(str(error))}
            except OSError as error:
                where = f" ({error.filename})" if error.filename else ""
                return {status: views.problem(f"{error.strerror or error}{where}.")}
            except Exception as error:
                traceback.print_exc()
                raise gr.Error(f"Unexpected {type(error).__name__}: {error}. This is a bug in "
                               "the app; the console where it runs has the details.") from error

        return handler

    return wrap
