"""How a training job ended, in words.

A trainer this app started is its child: its exit status and log say how it
ended. A trainer an earlier app started (followed again after a restart) has
no exit status for this app to read; its `status.json` says how it ended,
and a last state of "training" means it was killed before it could say so.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path

from core import run_lock
from core.run_lock import Owner
from gui.cli_runs import error_message, explain_failure
from gui.job_record import Job, Status

_STOPPED = re.compile(r"stopped after step (\d+)")
_DONE = re.compile(r"done: (\d+) steps, adapter written to (.+)")
# How a trainer stopped during start-up may exit: killed by the signal, or
# leaving with the shell's 128 + signal status.
_STOP_SIGNALS = {code for sig in (signal.SIGTERM, signal.SIGINT) for code in (-sig, 128 + sig)}


def stopped_message(step: object) -> str:
    return f"Stopped after step {step}; the state is saved. Press Resume to continue from there."


def done_message(steps: object) -> str:
    return f"Finished: {steps} steps. The adapter is in the Export tab."


def child_outcome(job: Job, returncode: int, output: str) -> tuple[Status, str, str]:
    """(status, message, final file) of a child that exited with `returncode`."""
    stopped = _STOPPED.search(output[-4096:])
    if returncode == 0 and stopped:
        return Status.STOPPED, stopped_message(stopped.group(1)), ""
    if returncode == 0:
        done = _DONE.search(output)
        steps, final = (done.group(1), done.group(2).strip()) if done else ("all", "")
        return Status.DONE, done_message(steps), final
    if job.status is Status.STOPPING and returncode in _STOP_SIGNALS:
        return Status.STOPPED, ("Stopped while starting up, before the first step; an earlier "
                                "saved state, if any, is untouched."), ""
    return Status.FAILED, explain_failure(returncode, output, "The trainer"), ""


def adopted_outcome(job: Job, owner: Owner | None, output: str) -> tuple[Status, str, str]:
    """(status, message, final file) of a trainer that is no child of this app,
    once it has gone: from its status.json, else from the log it wrote."""
    status = run_lock.read_status(Path(job.output_dir))
    if owner is not None and status is not None and _written_by(status, owner):
        state, step = status.get("state"), status.get("step")
        if state == run_lock.DONE:
            return Status.DONE, done_message(step), _final_file(job, status, output)
        if state == run_lock.STOPPED:
            return Status.STOPPED, stopped_message(step), ""
        if state == run_lock.FAILED:
            reason = str(status.get("error") or "") or error_message(output)
            return Status.FAILED, reason or "The trainer failed; see the log below.", ""
        return Status.INTERRUPTED, killed_message(owner.pid, step), ""
    return _outcome_from_log(job, owner, output)


def killed_message(pid: int, step: object = None) -> str:
    at = f" at step {step}" if step is not None else ""
    return (f"The trainer (process {pid}) ended{at} without finishing or saying why: it was "
            "killed (kill -9, a shutdown, or the system's out-of-memory killer). Press Resume "
            "to continue from its last saved state.")


def _outcome_from_log(job: Job, owner: Owner | None, output: str) -> tuple[Status, str, str]:
    # A trainer that keeps no status.json still says how it ended in the log.
    stopped, done = _STOPPED.search(output[-4096:]), _DONE.search(output[-4096:])
    if done:
        return Status.DONE, done_message(done.group(1)), done.group(2).strip()
    if stopped:
        return Status.STOPPED, stopped_message(stopped.group(1)), ""
    if reason := error_message(output):
        return Status.FAILED, reason, ""
    if owner is None:
        return Status.INTERRUPTED, ("The app was closed while this job ran. Press Resume to "
                                    "continue from its last saved state."), ""
    return Status.INTERRUPTED, killed_message(owner.pid), ""


def _written_by(status: dict, owner: Owner) -> bool:
    return status.get("pid") == owner.pid and (
        not owner.start_time or str(status.get("pid_start", "")) == owner.start_time)


def _final_file(job: Job, status: dict, output: str) -> str:
    files = status.get("files") or {}
    wanted = f"{job.name}.safetensors"
    named = [str(p) for p in files.values() if str(p).endswith(wanted)] \
        if isinstance(files, dict) else []
    if named:
        return named[0]
    if done := _DONE.search(output):
        return done.group(2).strip()
    default = Path(job.output_dir) / wanted
    return str(default) if default.is_file() else ""
