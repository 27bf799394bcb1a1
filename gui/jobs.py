"""The job runner: training runs as `python -m trainer train` child processes.

One job runs at a time; later ones wait in a queue. The state lives in the
server process (and in `jobs/N/job.json`), not in a page, so a reloaded page
or a second tab shows the same jobs, and a restarted app lists earlier runs
and can resume them. The child writes its output to `jobs/N/log.txt` rather
than into a pipe, in a session of its own: if the app dies, training carries
on, and the next app follows it again (gui/orphans.py).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from core.errors import UserError
from core.run_layout import RunLayout
from core.run_lock import live_owner, process_start_time
from gui.cli_runs import child_env
from gui.datadir import REPO
from gui.job_outcome import adopted_outcome, child_outcome
from gui.job_record import Job, Status, load_jobs, save_job
from gui.orphans import AdoptedTrainer, reconcile
from gui.run_files import read_tail

__all__ = ["TRAINER", "Job", "JobRunner", "Status"]

TRAINER = (sys.executable, "-m", "trainer")
_RUNNING = (Status.RUNNING, Status.STOPPING)


class JobRunner:
    """Starts, queues, stops and resumes training jobs; thread-safe."""

    def __init__(self, jobs_dir: Path, trainer: Sequence[str] = TRAINER,
                 env: dict[str, str] | None = None):
        self.jobs_dir = jobs_dir
        self.trainer = list(trainer)
        self.env = env or {}
        self._lock = threading.Lock()
        self._handles: dict[int, subprocess.Popen | AdoptedTrainer] = {}
        self.version = 0  # bumped on every change, so pages redraw only then
        self._jobs: list[Job] = load_jobs(jobs_dir)
        with self._lock:  # a followed trainer that ends at once waits for the list to settle
            for job in self._jobs:
                if job.status.active:  # the last app ended while it was
                    owner = reconcile(job)
                    self._save(job)
                    if owner is not None:
                        self._follow(job, AdoptedTrainer(owner))

    # --- what pages read ---------------------------------------------------
    def jobs(self) -> list[Job]:
        with self._lock:
            return list(self._jobs)

    def get(self, job_id: int) -> Job | None:
        return next((j for j in self.jobs() if j.id == job_id), None)

    def latest(self) -> Job | None:
        jobs = self.jobs()
        return jobs[-1] if jobs else None

    def current(self) -> Job | None:
        return next((j for j in self.jobs() if j.status in _RUNNING), None)

    def resumable(self) -> list[Job]:
        """What Resume can continue, newest first: per run folder, the latest
        job that ran there, if it stopped, failed or was interrupted."""
        latest: dict[str, Job] = {}
        for job in self.jobs():
            if job.started_at is not None or job.status.active:
                latest[_folder_key(job.output_dir)] = job
        return sorted((j for j in latest.values() if j.status.resumable), key=lambda j: -j.id)

    def check_free(self, folder: Path) -> None:
        """Refuse (UserError) when a trainer runs, or a job waits to run, in `folder`."""
        with self._lock:
            self._refuse_busy(folder)

    # --- actions -------------------------------------------------------------
    def submit(self, config: str, overrides: Sequence[str], output_dir: str, name: str,
               total_steps: int = 0, resume: bool = False) -> Job:
        with self._lock:
            self._refuse_busy(Path(output_dir))
            return self._submit(config, overrides, output_dir, name, total_steps, resume)

    def resume(self, job_id: int) -> Job:
        """The same config and overrides again, continuing from the saved state;
        refused (UserError, saying why) when that would not continue the job."""
        with self._lock:
            old = next((j for j in self._jobs if j.id == job_id), None)
            self._refuse_resume(job_id, old)
            return self._submit(old.config, old.overrides, old.output_dir, old.name,
                                old.total_steps, resume=True)

    def stop(self, job_id: int) -> Job | None:
        """A running job: SIGTERM, the trainer saves its state at the next
        step and exits. A queued one: taken off the queue."""
        with self._lock:
            job = next((j for j in self._jobs if j.id == job_id), None)
            if job is None:
                return None
            if job.status is Status.QUEUED:
                self._finish(job, Status.CANCELLED, "Taken off the queue before it started.")
            elif job.status is Status.RUNNING and job.id in self._handles:
                job.status = Status.STOPPING
                self._handles[job.id].send_signal(signal.SIGTERM)
                self._save(job)
        return job

    def wait(self, job_id: int, timeout: float) -> Job:
        """Until the job has ended (for tests and for shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.get(job_id)
            if job is not None and not job.status.active:
                return job
            time.sleep(0.05)
        raise TimeoutError(f"job {job_id} still {self.get(job_id).status} after {timeout} s")

    def shutdown(self, timeout: float = 120) -> None:
        """Stop the running jobs cleanly (their state saved) and drop the queue;
        trainers followed again after a restart stop too, as closing the app
        stops what it shows as training."""
        for job in self.jobs():
            if job.status is Status.QUEUED:
                self.stop(job.id)
        running = [j for j in self.jobs() if j.status in _RUNNING]
        for job in running:
            self.stop(job.id)
        for job in running:
            self.wait(job.id, timeout)

    # --- internals (called with the lock held) -----------------------------
    def _submit(self, config: str, overrides: Sequence[str], output_dir: str, name: str,
                total_steps: int, resume: bool) -> Job:
        job_id = max((j.id for j in self._jobs), default=0) + 1
        folder = self.jobs_dir / f"{job_id:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        job = Job(id=job_id, name=name, config=config, overrides=list(overrides),
                  output_dir=output_dir, resume=resume, total_steps=total_steps,
                  folder=str(folder))  # fmt: skip
        self._jobs.append(job)
        self._save(job)
        self._start_next()
        return job

    def _refuse_busy(self, folder: Path, ignore: Job | None = None) -> None:
        key = _folder_key(folder)
        busy = next((j for j in self._jobs if j.status.active and j is not ignore
                     and _folder_key(j.output_dir) == key), None)
        if busy is not None and busy.status is Status.QUEUED:
            raise UserError(f"Job {busy.id} is queued to train in {folder}; wait for it, or "
                            "press Stop to take it off the queue, or change output.name to "
                            "train something else.")
        if busy is not None:
            raise UserError(f"Job {busy.id} is still training in {folder} (process {busy.pid}); "
                            "a second trainer there would mix their files. Wait for it to end "
                            "or press Stop first, or change output.name to train something "
                            "else.")
        owner = live_owner(folder)
        if owner is not None:
            raise UserError(f"A trainer is already running in {folder} ({owner.describe()}) "
                            "that this app does not follow; a second one there would mix their "
                            "files. Wait for it to finish or stop it (kill -TERM "
                            f"{owner.pid}), or change output.name to train something else.")

    def _refuse_resume(self, job_id: int, job: Job | None) -> None:
        if job is None:
            raise UserError(f"There is no job {job_id}; choose one under Job to resume.")
        if job.started_at is None:
            raise UserError(f"Job {job.id} ({job.name}) never started, so it has no saved state "
                            "to resume; press Start to run it.")
        self._refuse_busy(Path(job.output_dir))
        later = [j for j in self._jobs if j.id > job.id and j.started_at is not None
                 and _folder_key(j.output_dir) == _folder_key(job.output_dir)]
        if later:
            raise UserError(f"Job {job.id} was continued by job {later[-1].id} in the same "
                            f"folder; resume job {later[-1].id} instead.")
        if job.status is Status.DONE:
            raise UserError(f"Job {job.id} ({job.name}) finished all its steps; raise "
                            "train.steps in the form and press Resume with no job chosen "
                            "to train it further.")
        if RunLayout(Path(job.output_dir)).saved_step() is None:
            raise UserError(f"Job {job.id} ({job.name}) saved no training state in "
                            f"{job.output_dir} before it ended, so there is nothing to resume; "
                            "press Start to train it from the beginning.")

    def _start_next(self) -> None:
        if any(j.status in _RUNNING for j in self._jobs):
            return  # one at a time, followed trainers included
        job = next((j for j in self._jobs if j.status is Status.QUEUED), None)
        if job is None:
            return
        try:
            self._refuse_busy(Path(job.output_dir), ignore=job)
            process = self._launch(job)
        except (UserError, OSError) as error:
            reason = str(error) if isinstance(error, UserError) else (
                f"The trainer could not be started: {error}.")
            self._finish(job, Status.FAILED, reason)
            self._start_next()
            return
        job.status, job.started_at = Status.RUNNING, time.time()
        job.pid, job.pid_start = process.pid, process_start_time(process.pid)
        job.host = socket.gethostname()
        self._save(job)
        self._follow(job, process)

    def _launch(self, job: Job) -> subprocess.Popen:
        with open(job.log_path, "ab") as log:  # the child keeps its own descriptor
            # A session of its own: the trainer outlives an app that dies
            # without stopping it (and is followed again by the next one);
            # Ctrl-C in the app's terminal reaches only the app, whose
            # shutdown() stops the trainer with SIGTERM, state saved.
            return subprocess.Popen(
                [*self.trainer, *job.arguments()], cwd=REPO, env=child_env(self.env),
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip

    def _follow(self, job: Job, handle: subprocess.Popen | AdoptedTrainer) -> None:
        self._handles[job.id] = handle
        threading.Thread(target=self._watch, args=(job, handle), daemon=True).start()

    def _watch(self, job: Job, handle: subprocess.Popen | AdoptedTrainer) -> None:
        returncode = handle.wait()
        output = read_tail(job.log_path, 1 << 20)
        with self._lock:
            if isinstance(handle, AdoptedTrainer):
                status, message, final = adopted_outcome(job, handle.owner, output)
            else:
                job.returncode = returncode
                status, message, final = child_outcome(job, returncode, output)
            job.final_file = final or job.final_file
            self._handles.pop(job.id, None)
            self._finish(job, status, message)
            self._start_next()

    def _finish(self, job: Job, status: Status, message: str) -> None:
        job.status, job.message, job.finished_at = status, message, time.time()
        self._save(job)

    def _save(self, job: Job) -> None:
        self.version += 1
        save_job(job)


def _folder_key(folder: str | Path) -> str:
    return os.path.normpath(os.path.abspath(folder))
