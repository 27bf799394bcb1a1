"""Trainers that outlive the app that started them.

Training runs in its own session, so a GUI that dies without cleaning up (kill
-9, a crash, its terminal closed) leaves the trainer training; the next app
finds it through the run folder's lock (core/run_lock.py) or the pid and
start time recorded in job.json, and follows it again instead of starting a
second trainer on the same files.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path

from core.run_lock import Owner, is_alive, live_owner
from gui.job_outcome import adopted_outcome
from gui.job_record import Job, Status
from gui.run_files import read_tail

POLL_SECONDS = 0.25


class AdoptedTrainer:
    """A trainer that is no child of this process: it cannot be waited for,
    only watched, and has no exit status (its status.json says how it ended)."""

    def __init__(self, owner: Owner):
        self.owner = owner
        self.pid = owner.pid

    def wait(self) -> None:
        while is_alive(self.owner):
            time.sleep(POLL_SECONDS)

    def send_signal(self, signum: int) -> None:
        if is_alive(self.owner):  # never signal whoever got the pid next
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.owner.pid, signum)


def local_owner(folder: Path) -> Owner | None:
    """The live trainer holding `folder`, if it runs on this machine (one on
    another machine sharing the folder can be named but not followed)."""
    owner = live_owner(folder)
    return owner if owner is not None and owner.host == socket.gethostname() else None


def live_trainer(job: Job) -> Owner | None:
    """The job's trainer, if it still runs on this machine."""
    owner = local_owner(Path(job.output_dir))
    if owner is not None and (job.pid is None or _same(owner, job)):
        return owner  # job.json from a version that did not record the pid: the lock knows
    recorded = job.trainer
    if (recorded is not None and recorded.start_time and recorded.host == socket.gethostname()
            and is_alive(recorded)):
        return recorded  # a trainer that keeps no lock
    return None


def reconcile(job: Job) -> Owner | None:
    """A job that was active when the last app ended: its live trainer, to
    follow again, or None after settling how it ended."""
    if job.status is Status.QUEUED:
        job.status = Status.CANCELLED
        job.message = "The app was closed before this job started; it never ran."
        return None
    owner = live_trainer(job)
    if owner is not None:
        job.pid, job.pid_start, job.host = owner.pid, owner.start_time, owner.host
        job.message = (f"The app was restarted while this job trained; it follows its trainer "
                       f"(process {owner.pid}) again.")
        return owner
    job.finished_at = job.finished_at or time.time()
    holder = live_owner(Path(job.output_dir))
    if holder is not None:  # on another machine, or not the trainer this job started
        job.status = Status.INTERRUPTED
        job.message = (f"A trainer ({holder.describe()}) still holds {job.output_dir}, and this "
                       "app cannot follow it; once it has ended, Resume continues from the last "
                       "saved state.")
        return None
    job.status, job.message, job.final_file = adopted_outcome(
        job, job.trainer, read_tail(job.log_path, 1 << 20))
    return None


def _same(owner: Owner, job: Job) -> bool:
    return owner.pid == job.pid and (not job.pid_start or owner.start_time == job.pid_start)
