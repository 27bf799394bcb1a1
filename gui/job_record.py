"""A training job as the GUI records it: `jobs/N/job.json`, read back by a
restarted app. Files written by older versions (fewer fields) and newer ones
(more fields) load; one that cannot be read is left alone and reported on
the console, never a reason for the app not to start."""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path

from core.atomic import atomic_write_text
from core.errors import UserError
from core.run_lock import Owner


class Status(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    STOPPING = "stopping"
    DONE = "done"
    STOPPED = "stopped"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"  # its trainer ended (or the app did) before it finished

    @property
    def active(self) -> bool:
        return self in (Status.QUEUED, Status.RUNNING, Status.STOPPING)

    @property
    def resumable(self) -> bool:
        return self in (Status.STOPPED, Status.FAILED, Status.INTERRUPTED)


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
    # The trainer process, so that an app started later can tell whether it
    # still runs (pids are reused: the start time makes it unique).
    pid: int | None = None
    pid_start: str = ""
    host: str = ""

    @property
    def log_path(self) -> Path:
        return Path(self.folder) / "log.txt"

    @property
    def trainer(self) -> Owner | None:
        if self.pid is None:
            return None
        return Owner(self.pid, self.pid_start, self.host, self.started_at or 0.0)

    def arguments(self) -> list[str]:
        args = ["train", self.config]
        for override in self.overrides:
            args += ["--set", override]
        return args + (["--resume"] if self.resume else [])

    def command_line(self) -> str:
        """What to type to run the same job in a terminal."""
        return shlex.join(["python", "-m", "trainer", *self.arguments()])


_FIELDS = {f.name for f in dataclasses.fields(Job)}
_REQUIRED = {f.name for f in dataclasses.fields(Job)
             if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}


def save_job(job: Job) -> None:
    try:
        atomic_write_text(Path(job.folder) / "job.json", json.dumps(asdict(job), indent=1))
    except UserError as error:
        # The job goes on; only a later app would not see its last state.
        print(f"warning: {error}", file=sys.stderr)


def load_jobs(jobs_dir: Path) -> list[Job]:
    """The jobs recorded in `jobs_dir`, oldest first, as they were saved."""
    jobs = []
    for path in sorted(jobs_dir.glob("*/job.json")):
        job = read_job(path)
        if job is None:
            print(f"warning: {path} is not a readable job record; it is left out of the job "
                  "list (move it away to silence this).", file=sys.stderr)
        else:
            jobs.append(job)
    jobs.sort(key=lambda j: j.id)
    return jobs


def read_job(path: Path) -> Job | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not _REQUIRED <= data.keys():
        return None
    known = {key: value for key, value in data.items() if key in _FIELDS}
    try:
        known["status"] = Status(known.get("status", Status.INTERRUPTED))
    except ValueError:  # a state this version does not know
        known["status"] = Status.INTERRUPTED
    try:
        job = Job(**known)
        job.id, job.overrides = int(job.id), [str(o) for o in job.overrides]
    except (TypeError, ValueError):
        return None
    job.folder = str(path.parent)  # the data folder may have moved since
    return job
