"""The job runner: training runs as `python -m trainer train` child processes.

One job runs at a time; later ones wait in a queue. The state lives in the
server process (and in `jobs/N/job.json`), not in a page, so a reloaded page
or a second tab shows the same jobs, and a restarted app lists earlier runs
and can resume them. The child writes its output to `jobs/N/log.txt` rather
than into a pipe: if the app dies, training carries on and finishes normally.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path

from gui.cli_runs import child_env, explain_failure
from gui.datadir import REPO
from gui.run_files import read_tail

TRAINER = (sys.executable, "-m", "trainer")
_STOPPED = re.compile(r"stopped after step (\d+)")
_DONE = re.compile(r"done: (\d+) steps, adapter written to (.+)")


class Status(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    STOPPING = "stopping"
    DONE = "done"
    STOPPED = "stopped"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"  # the app ended while the job ran

    @property
    def active(self) -> bool:
        return self in (Status.QUEUED, Status.RUNNING, Status.STOPPING)


@dataclass
class Job:
    id: int
    name: str  # output.name, for people
    config: str  # the base TOML (a preset or the GUI's defaults file)
    overrides: list[str]  # `--set` values on top of it
    output_dir: str
    resume: bool = False
    total_steps: int = 0  # train.steps; 0 when the run is given in epochs
    status: Status = Status.QUEUED
    message: str = ""  # how it ended, in words
    returncode: int | None = None
    final_file: str = ""
    submitted_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    folder: str = ""  # jobs/N: job.json and log.txt

    @property
    def log_path(self) -> Path:
        return Path(self.folder) / "log.txt"

    def arguments(self) -> list[str]:
        args = ["train", self.config]
        for override in self.overrides:
            args += ["--set", override]
        return args + (["--resume"] if self.resume else [])

    def command_line(self) -> str:
        """What to type to run the same job in a terminal."""
        import shlex

        return shlex.join(["python", "-m", "trainer", *self.arguments()])


class JobRunner:
    """Starts, queues, stops and resumes training jobs; thread-safe."""

    def __init__(self, jobs_dir: Path, trainer: Sequence[str] = TRAINER,
                 env: dict[str, str] | None = None):
        self.jobs_dir = jobs_dir
        self.trainer = list(trainer)
        self.env = env or {}
        self._lock = threading.Lock()
        self._jobs: list[Job] = _load_jobs(jobs_dir)
        self._process: subprocess.Popen | None = None
        self.version = 0  # bumped on every change, so pages redraw only then

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
        return next((j for j in self.jobs() if j.status in (Status.RUNNING, Status.STOPPING)),
                    None)

    # --- actions -------------------------------------------------------------
    def submit(self, config: str, overrides: Sequence[str], output_dir: str, name: str,
               total_steps: int = 0, resume: bool = False) -> Job:
        with self._lock:
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

    def stop(self, job_id: int) -> Job | None:
        """A running job: SIGTERM, the trainer saves its state at the next
        step and exits. A queued one: taken off the queue."""
        with self._lock:
            job = next((j for j in self._jobs if j.id == job_id), None)
            if job is None:
                return None
            if job.status is Status.QUEUED:
                self._finish(job, Status.CANCELLED, "Taken off the queue before it started.")
            elif job.status is Status.RUNNING and self._process is not None:
                job.status = Status.STOPPING
                self._process.send_signal(signal.SIGTERM)
                self._save(job)
        return job

    def resume(self, job_id: int) -> Job:
        """The same config and overrides again, continuing from the saved state."""
        old = self.get(job_id)
        if old is None:
            raise KeyError(job_id)
        return self.submit(old.config, old.overrides, old.output_dir, old.name,
                           old.total_steps, resume=True)

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
        """Stop the running job cleanly (its state saved) and drop the queue."""
        for job in self.jobs():
            if job.status is Status.QUEUED:
                self.stop(job.id)
        running = self.current()
        if running is not None:
            self.stop(running.id)
            self.wait(running.id, timeout)

    # --- internals (called with the lock held) -----------------------------
    def _start_next(self) -> None:
        if self._process is not None:
            return
        job = next((j for j in self._jobs if j.status is Status.QUEUED), None)
        if job is None:
            return
        log = open(job.log_path, "ab")  # noqa: SIM115 - the child holds it; closed below
        try:
            process = subprocess.Popen(
                [*self.trainer, *job.arguments()], cwd=REPO, env=child_env(self.env),
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        except OSError as exc:
            log.close()
            self._finish(job, Status.FAILED, f"The trainer could not be started: {exc}.")
            self._start_next()
            return
        log.close()  # the child has its own copy of the descriptor
        self._process = process
        job.status, job.started_at = Status.RUNNING, time.time()
        self._save(job)
        threading.Thread(target=self._watch, args=(job, process), daemon=True).start()

    def _watch(self, job: Job, process: subprocess.Popen) -> None:
        returncode = process.wait()
        output = read_tail(job.log_path, 1 << 20)
        with self._lock:
            job.returncode = returncode
            status, message = _outcome(job, returncode, output)
            if status is Status.DONE:
                match = _DONE.search(output)
                job.final_file = match.group(2).strip() if match else ""
            self._process = None
            self._finish(job, status, message)
            self._start_next()

    def _finish(self, job: Job, status: Status, message: str) -> None:
        job.status, job.message, job.finished_at = status, message, time.time()
        self._save(job)

    def _save(self, job: Job) -> None:
        self.version += 1
        path = Path(job.folder) / "job.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(job), indent=1))
        tmp.replace(path)


def _outcome(job: Job, returncode: int, output: str) -> tuple[Status, str]:
    stopped = _STOPPED.search(output[-4096:])
    if returncode == 0 and stopped:
        return Status.STOPPED, (f"Stopped after step {stopped.group(1)}; the state is saved. "
                                "Press Resume to continue from there.")
    if returncode == 0:
        done = _DONE.search(output)
        steps = done.group(1) if done else "all"
        return Status.DONE, f"Finished: {steps} steps. The adapter is in the Export tab."
    if job.status is Status.STOPPING and returncode == -signal.SIGTERM:
        return Status.STOPPED, ("Stopped while starting up, before the first step; an earlier "
                                "saved state, if any, is untouched.")
    return Status.FAILED, explain_failure(returncode, output, "The trainer")


def _load_jobs(jobs_dir: Path) -> list[Job]:
    """Jobs of earlier sessions; those that were active when the app ended
    are marked interrupted (their saved state, if any, can be resumed)."""
    jobs = []
    for path in sorted(jobs_dir.glob("*/job.json")):
        data = json.loads(path.read_text())
        job = Job(**{**data, "status": Status(data["status"])})
        if job.status.active:
            job.status = Status.INTERRUPTED
            job.message = ("The app was closed while this job was active. Press Resume to "
                           "continue from its last saved state.")
        jobs.append(job)
    return jobs
