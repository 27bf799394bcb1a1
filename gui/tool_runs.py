"""Running one LoRA tool for the Tools tab, without Gradio: the child
followed line by line for its `progress:` lines (core/tool_progress.py), then
how it ended, in words: what it wrote (its last `wrote: PATH` line), or why it
failed, as one paragraph (gui/cli_runs.py explains signals, crashes and lack
of memory)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from core.errors import UserError
from core.tool_progress import PREFIX, last_progress
from gui.cli_runs import CANCELLED, CliResult, child_env, explain_failure
from gui.datadir import REPO
from gui.tools import Planned

TIMEOUT_S = 6 * 3600  # an SD1.5 extract on a slow CPU takes long; Cancel ends it sooner
WROTE = "wrote: "
# Every tool's last stdout line is `wrote: PATH` (what the CLIs promise).
_WROTE = re.compile(r"^wrote: (.+)$")
# gui.cli_runs.explain_failure points at a log; the Tools tab shows none.
LOG_BELOW = ("the log below has the details", "see the log below")
CONSOLE = "the console where the app runs has the details"
_USAGE = re.compile(r"^usage: .*?^\S[^\n]*?: error: (.*)\Z", re.DOTALL | re.MULTILINE)


@dataclass(frozen=True)
class Done:
    path: Path
    report: str  # what the tool printed besides its `wrote:` line


Progress = tuple[int, int, str]  # the last `progress: DONE/TOTAL WHAT` line


def follow(command: list[str], what: str, cancel: threading.Event | None = None,
           timeout: float = TIMEOUT_S, poll: float = 0.2) -> Iterator[Progress | CliResult]:
    """Run a tool, yielding each new progress line as it is printed and, last,
    its CliResult. Cancel (or closing this generator: the page went away)
    kills the child; the tools write atomically, so nothing half-written stays."""
    process = subprocess.Popen(
        command, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, errors="replace", stdin=subprocess.DEVNULL,
    )  # fmt: skip
    stdout: list[str] = []
    stderr: deque[str] = deque(maxlen=4000)  # the error paragraph is at the end
    latest: list[Progress | None] = [None]
    readers = [threading.Thread(target=_drain, args=(process.stdout, stdout, None), daemon=True),
               threading.Thread(target=_drain, args=(process.stderr, stderr, latest), daemon=True)]
    for reader in readers:
        reader.start()
    deadline, shown = time.monotonic() + timeout, None
    try:
        while True:
            try:
                process.wait(timeout=poll)
                break
            except subprocess.TimeoutExpired:
                pass
            if latest[0] != shown:
                shown = latest[0]
                yield shown
            stopped = _stopped(cancel, deadline, what, timeout)
            if stopped is not None:
                _end(process)
                yield stopped
                return
        for reader in readers:
            reader.join(timeout=5)
        if latest[0] != shown:
            yield latest[0]
        yield CliResult(process.returncode, "".join(stdout), "".join(stderr))
    finally:
        _end(process)


def _drain(stream, sink, latest: list | None) -> None:
    for line in stream:
        sink.append(line)
        if latest is not None and line.startswith(PREFIX):
            latest[0] = last_progress(line.rstrip("\n")) or latest[0]
    stream.close()


def _stopped(cancel: threading.Event | None, deadline: float, what: str,
             timeout: float) -> CliResult | None:
    if cancel is not None and cancel.is_set():
        return CliResult(CANCELLED, "", f"error: {what} was cancelled; nothing was written.")
    if time.monotonic() > deadline:
        return CliResult(-1, "", f"error: {what} took longer than {timeout:.0f} s and was "
                                 "stopped; nothing was written.")
    return None


def _end(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()


def outcome(planned: Planned, result: CliResult) -> Done:
    """What the run wrote; UserError with the reason, in words, when it failed."""
    if result.returncode != 0:
        raise UserError(failure(planned, result))
    lines = result.stdout.rstrip().splitlines()
    wrote = next((line for line in reversed(lines) if _WROTE.match(line)), None)
    if wrote is None:
        raise UserError(f"{planned.what} ended without saying which file it wrote (no "
                        f"'{WROTE}PATH' line); expected {planned.out}.")
    named = _WROTE.match(wrote).group(1).strip()
    path = Path(named) if Path(named).is_absolute() else REPO / named
    if not path.exists():
        raise UserError(f"{planned.what} said it wrote {path}, but there is no such file.")
    report = "\n".join(line for line in lines if line is not wrote).strip()
    return Done(path, report)


def failure(planned: Planned, result: CliResult) -> str:
    """Why the tool failed, in words; the details of a crash go to the app's console."""
    usage = _USAGE.search(result.stderr.rstrip())
    if result.returncode == 2 and usage:  # argparse: this install's tool takes other arguments
        return (f"{planned.what}: the tool refused the command line the page built "
                f"({usage.group(1).strip()}). Is the app older or newer than its tools? "
                f"Run `{shlex.join(['python', *planned.command[1:4]])} --help` to see what it "
                "takes.")
    message = explain_failure(result.returncode, result.stderr, planned.what)
    for words in LOG_BELOW:
        if words in message:
            print(f"--- {shlex.join(planned.command)}\n{result.stderr}", file=sys.stderr)
            message = message.replace(words, CONSOLE)
    return message


def describe(planned: Planned, done: Done, seconds: float) -> str:
    """The result line: what was written and where to find it in the page."""
    where = {
        "adapter": f"The Export tab lists it as {done.path.name} ({done.path.parent.name}).",
        "model": "Use it as model.path in the Train tab or as the base model in the Preview tab.",
        "preset": "Press 'Load the imported preset into the Train tab' to fill the Train tab "
                  f"with it; it is kept as the preset \"{done.path.stem} (mine)\".",
    }[planned.kind]
    return f"{planned.what} wrote {done.path} in {seconds:.0f} s. {where}"


def prepare(planned: Planned) -> None:
    """The folder the tool writes into (the tools write the file atomically)."""
    os.makedirs(planned.out.parent, exist_ok=True)
