"""Running the project's CLIs as child processes and explaining how they ended.

The CLIs report a problem the user can fix as one `error: ...` paragraph on
stderr and exit 2. Anything else that ends a child (a signal, a Python
traceback) is explained here in words, so the page never shows a bare exit
status or a traceback.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from gui.datadir import REPO

# The last `error: ` paragraph. tqdm redraws its bar with '\r' and no newline,
# so the error may follow a bar fragment ending in ']' on the same line.
_ERROR = re.compile(r"(?:^|(?<=[\r\n\]]))error: (.*)\Z", re.DOTALL)
_OOM_HINTS = ("out of memory", "outofmemoryerror", "cannot allocate memory", "memoryerror")
CANCEL_POLL_SECONDS = 0.2
CANCELLED = -2  # the returncode of a run stopped by its cancel switch
OOM_ADVICE = (
    "Lower train.batch_size or dataset.resolution, turn on train.gradient_checkpointing, "
    "use the low-vram preset, or close other programs using the memory."
)


@dataclass(frozen=True)
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The GUI's environment, plus what the children need wherever the GUI was started."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(REPO), env.get("PYTHONPATH"))))
    env["PYTHONUNBUFFERED"] = "1"  # log lines reach the page as they are printed
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.update(extra or {})
    return env


def run_cli(command: list[str], what: str, timeout: float = 3600,
            cancel: threading.Event | None = None) -> CliResult:
    """Run a CLI to completion, or until `cancel` is set (the child is then
    killed). Its failures are returned, not raised: each caller decides what
    an exit status means (`check` exits 1 for "not trainable")."""
    process = subprocess.Popen(
        command, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, errors="replace", stdin=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + timeout
    while True:
        try:
            stdout, stderr = process.communicate(timeout=CANCEL_POLL_SECONDS)
            return CliResult(process.returncode, stdout, stderr)
        except subprocess.TimeoutExpired:
            pass  # retrying communicate() loses no output
        if cancel is not None and cancel.is_set():
            _end(process)
            return CliResult(CANCELLED, "", f"error: {what} was cancelled; nothing was changed.")
        if time.monotonic() > deadline:
            _end(process)
            return CliResult(-1, "", f"error: {what} took longer than {timeout:.0f} s and was "
                                     "stopped.")


def _end(process: subprocess.Popen) -> None:
    process.kill()
    process.communicate()


def error_message(output: str) -> str | None:
    """The text of the CLI's `error: ...` paragraph, if it printed one."""
    match = _ERROR.search(output.rstrip())
    return match.group(1).strip() if match else None


def explain_failure(returncode: int, output: str, what: str) -> str:
    """Why a child exited with `returncode`, in words, from its output."""
    message = error_message(output)
    if message:
        return message
    lowered = output.lower()
    killed = -returncode if returncode < 0 else returncode - 128 if returncode > 128 else 0
    if killed == signal.SIGKILL:
        return (f"{what} was killed (SIGKILL) without a word: most often the system ran out "
                f"of memory and the kernel's OOM killer ended it. {OOM_ADVICE}")
    if any(hint in lowered for hint in _OOM_HINTS):
        return f"{what} ran out of memory ({last_exception(output)}). {OOM_ADVICE}"
    if killed > 0:
        name = _signal_name(killed)
        return f"{what} was ended by signal {name} from outside this app."
    exception = last_exception(output)
    if exception:
        return (f"{what} crashed with {exception}. This is a bug in the trainer, not in "
                "your settings; the log below has the details.")
    return f"{what} ended with exit status {returncode} without saying why; see the log below."


def last_exception(output: str) -> str:
    """The `SomeError: message` line ending a Python traceback, or ''."""
    if "Traceback (most recent call last)" not in output:
        return ""
    tail = output.split("Traceback (most recent call last)")[-1]
    lines = [line.strip() for line in re.split(r"[\r\n]+", tail) if line.strip()]
    for line in reversed(lines):
        if re.match(r"^[\w.]+(Error|Exception|Interrupt|Exit)\b", line):
            return line if len(line) <= 300 else line[:297] + "..."
    return lines[-1] if lines else ""


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)
