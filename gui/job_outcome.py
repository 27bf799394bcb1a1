"""How a training job ended, in words.

The trainer says how it ended in its run folder's `status.json`, however it
leaves (done, stopped, failed), and the GUI goes by that, for a trainer this
app started as for one an earlier app started and this one followed again
(which has no exit status to read). Only a status.json the job's own trainer
wrote counts: the folder may hold an earlier run's. Without one (a trainer
killed before it could write it, or an older trainer that keeps none) the
exit status and the run folder's files tell. The log is read only for the
words of a failure: the explanation of a crash, a signal or a lack of memory.
"""

from __future__ import annotations

import signal
from pathlib import Path

from core import run_lock
from core.run_layout import RunLayout
from core.run_lock import Owner
from gui.cli_runs import error_message, explain_failure
from gui.job_record import Job, Status

# The trainer's exit status for a problem the user can fix (a UserError):
# its status.json holds the whole message then.
USER_ERROR_EXIT = 2
# How a trainer stopped during start-up may exit: killed by the signal, or
# leaving with the shell's 128 + signal status.
_STOP_SIGNALS = {code for sig in (signal.SIGTERM, signal.SIGINT) for code in (-sig, 128 + sig)}

Outcome = tuple[Status, str, str]  # status, message, final adapter file ("" if none)


def stopped_message(step: object) -> str:
    at = f" after step {step}" if step is not None else ""
    return f"Stopped{at}; the state is saved. Press Resume to continue from there."


def done_message(steps: object) -> str:
    return f"Finished: {steps} steps. The adapter is in the Export tab."


def killed_message(pid: int, step: object = None) -> str:
    at = f" at step {step}" if step is not None else ""
    return (f"The trainer (process {pid}) ended{at} without finishing or saying why: it was "
            "killed (kill -9, a shutdown, or the system's out-of-memory killer). Press Resume "
            "to continue from its last saved state.")


def oom_retry_notes(status: dict | None) -> list[str]:
    """The trainer's retries after out of memory (train.oom_retry; status.json
    "oom_retries", written by trainer/run_guard.py), one sentence each."""
    retries = status.get("oom_retries") if isinstance(status, dict) else None
    if not isinstance(retries, list):
        return []
    return [f"Out of memory at step {r.get('step')}: retried from step {r.get('from_step')} "
            f"with {r.get('change')}." for r in retries if isinstance(r, dict)]


def own_status(job: Job, owner: Owner | None) -> dict | None:
    """The job folder's status.json if `owner` (the job's trainer) wrote it."""
    status = run_lock.read_status(Path(job.output_dir))
    if owner is None or status is None or not _written_by(status, owner):
        return None
    return status


def child_outcome(job: Job, returncode: int, output: str) -> Outcome:
    """How a child of this app that exited with `returncode` ended."""
    status = own_status(job, job.trainer)
    # A Stop that reached a trainer after it had finished (while it exited) stops nothing.
    finished = status is not None and status.get("state") == run_lock.DONE
    if job.status is Status.STOPPING and returncode in _STOP_SIGNALS and not finished:
        return Status.STOPPED, ("Stopped while starting up, before the first step; an earlier "
                                "saved state, if any, is untouched."), ""
    if status is not None and status.get("state") in run_lock.FINAL_STATES:
        return _from_status(job, status, lambda error: _failure(returncode, error, output))
    if returncode == 0:
        return _from_files(job)
    return Status.FAILED, explain_failure(returncode, output, "The trainer"), ""


def adopted_outcome(job: Job, owner: Owner | None, output: str) -> Outcome:
    """How a trainer that is no child of this app ended, once it has gone."""
    status = own_status(job, owner)
    if status is not None and status.get("state") in run_lock.FINAL_STATES:
        return _from_status(job, status, lambda error: error or error_message(output) or
                            "The trainer failed; see the log below.")
    if status is not None:  # its last word was "starting" or "training"
        return Status.INTERRUPTED, killed_message(owner.pid, status.get("step")), ""
    if reason := error_message(output):  # a trainer that keeps no status.json
        return Status.FAILED, reason, ""
    if _fresh_final(job):
        return _from_files(job)
    if owner is None:
        return Status.INTERRUPTED, ("The app was closed while this job ran. Press Resume to "
                                    "continue from its last saved state."), ""
    return Status.INTERRUPTED, killed_message(owner.pid), ""


def _from_status(job: Job, status: dict, failure) -> Outcome:
    state, step = status.get("state"), status.get("step")
    if state == run_lock.DONE:
        return Status.DONE, done_message(step), _final_file(job, status)
    if state == run_lock.STOPPED:
        return Status.STOPPED, stopped_message(step), ""
    return Status.FAILED, failure(str(status.get("error") or "")), ""


def _failure(returncode: int, error: str, output: str) -> str:
    """The trainer's own message for a problem the user can fix; anything else
    (a bug, memory, a signal) explained from the exit status and the log,
    whose traceback says more than status.json's one line."""
    if error and (returncode == USER_ERROR_EXIT or not output.strip()):
        return error
    return explain_failure(returncode, output, "The trainer")


def _from_files(job: Job) -> Outcome:
    """A trainer that exited cleanly without a status.json of its own: done if
    it wrote the final adapter, else it stopped early (its state saved)."""
    run = RunLayout(Path(job.output_dir), job.name)
    if _fresh_final(job):
        return Status.DONE, done_message(run.saved_step() or "all"), str(run.final_file)
    return Status.STOPPED, stopped_message(run.saved_step()), ""


def _fresh_final(job: Job) -> bool:
    """The final adapter exists and was written while this job ran (not by an
    earlier run in the same folder)."""
    final = RunLayout(Path(job.output_dir), job.name).final_file
    try:
        written = final.stat().st_mtime
    except OSError:
        return False
    return written >= (job.started_at or 0.0) - 1.0  # 1 s: file systems with coarse times


def _written_by(status: dict, owner: Owner) -> bool:
    return status.get("pid") == owner.pid and (
        not owner.start_time or str(status.get("pid_start", "")) == owner.start_time)


def _final_file(job: Job, status: dict) -> str:
    files = status.get("files")
    final = files.get("final") if isinstance(files, dict) else None
    if final:
        return str(final)
    default = RunLayout(Path(job.output_dir), job.name).final_file
    return str(default) if default.is_file() else ""
