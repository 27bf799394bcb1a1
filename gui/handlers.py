"""What every event handler shares: failures become a message in the page.

A handler returns {component: value} for what it changes. A `UserError` or
an `OSError` (a full disk, a folder without permission) ends the action with
the reason in the tab's status box; anything else is a bug, reported in the
page as one line (the traceback goes to the console, for a bug report).
"""

from __future__ import annotations

import functools
import traceback
from dataclasses import dataclass
from typing import Any

from gui import views
from gui.datadir import DataDirs
from gui.jobs import JobRunner
from trainer.errors import UserError


@dataclass
class Context:
    """What the tabs share: folders, the job runner, the generated form."""

    dirs: DataDirs
    runner: JobRunner
    form: dict[str, Any]  # "section.key" -> input component
    tabs: Any = None  # gr.Tabs, to switch tab from a button


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
