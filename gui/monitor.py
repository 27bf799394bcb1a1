"""The Train tab's live view: status, progress, loss plot, previews and log
of the current (else the latest) job, and the jobs Resume can continue,
redrawn by a timer only when something changed, so an idle page costs
nothing and plots do not flicker."""

from __future__ import annotations

from pathlib import Path

from core.run_layout import RunLayout
from gui import views
from gui.job_outcome import oom_retry_notes, own_status
from gui.jobs import Job, JobRunner, Status
from gui.run_files import MetricsReader, best_validation, log_lines, read_tail, tqdm_total

_STATUS_WORDS = {
    Status.QUEUED: "Waiting for the running job to finish",
    Status.RUNNING: "Training",
    Status.STOPPING: "Stopping: saving the state at the end of this step",
    Status.DONE: "Finished",
    Status.STOPPED: "Stopped",
    Status.FAILED: "Failed",
    Status.CANCELLED: "Cancelled",
    Status.INTERRUPTED: "Interrupted",
}


class Monitor:
    def __init__(self, runner: JobRunner):
        self.runner = runner
        self._readers: dict[int, MetricsReader] = {}

    def shown_job(self) -> Job | None:
        """The running job, else the latest that ran: one that never started
        (cancelled, or left queued by a closed app) has nothing to show."""
        jobs = self.runner.jobs()
        ran = [j for j in jobs if j.started_at is not None]
        return self.runner.current() or (ran or jobs or [None])[-1]

    def resume_choices(self) -> list[tuple[str, int]]:
        """(label, job id) of what Resume can continue, newest first."""
        choices = []
        for job in self.runner.resumable():
            step = RunLayout(Path(job.output_dir)).saved_step()
            saved = f"saved at step {step}" if step is not None else "no saved state"
            choices.append((f"Job {job.id}: {job.name} ({job.status.value}, {saved})", job.id))
        return choices

    def signature(self) -> tuple:
        """Changes whenever anything on screen would."""
        job = self.shown_job()
        if job is None:
            return (self.runner.version,)
        run = RunLayout(Path(job.output_dir))
        samples = run.samples.stat().st_mtime_ns if run.samples.is_dir() else 0
        return (self.runner.version, job.id, _size(job.log_path), _size(run.metrics), samples)

    def view(self) -> dict[str, object]:
        job = self.shown_job()
        if job is None:
            return {"status": "No training yet: set up the form and press **Start**.",
                    "progress": "", "metrics": [], "samples": [], "log": "", "jobs": ""}
        run = RunLayout(Path(job.output_dir))
        reader = self._readers.setdefault(job.id, MetricsReader(run.metrics))
        metrics = reader.read()
        tail = read_tail(job.log_path)
        last = metrics[-1] if metrics else None
        total = _total_steps(job) or tqdm_total(tail) or job.total_steps or None
        if job.status in (Status.RUNNING, Status.STOPPING):
            progress = views.progress(last.step if last else 0, total, last)
        elif last is not None:
            progress = views.progress(last.step, total, last)
        else:
            progress = ""
        return {
            "status": _status(job),
            "progress": progress,
            "metrics": metrics,
            "validation": list(reader.validation),
            "best": best_validation(run.validation),  # the plot's caption
            "samples": [str(p) for p in run.shown_samples()],
            "log": "\n".join(log_lines(tail)),
            "jobs": _jobs_table(self.runner.jobs()),
        }


def _total_steps(job: Job) -> int | None:
    """The step count the job's trainer reports in status.json (known with
    train.epochs too); the log's progress bar says it for one that keeps none."""
    status = own_status(job, job.trainer)
    total = status.get("total") if status is not None else None
    return total if isinstance(total, int) and total > 0 else None


def _status(job: Job) -> str:
    text = f"**Job {job.id} ({views.escape(job.name)}): {_STATUS_WORDS[job.status]}.**"
    # Retries after out of memory (train.oom_retry), while it runs and after.
    retries = "".join(f"\n\n{views.escape(note)}"
                      for note in oom_retry_notes(own_status(job, job.trainer)))
    if job.status is Status.FAILED:
        return text + retries + "\n\n" + views.problem(job.message)
    if job.message:
        text += " " + views.escape(job.message)
    return text + retries


def _jobs_table(jobs: list[Job]) -> str:
    if len(jobs) < 2:
        return ""
    rows = ["| job | name | status | started as |", "|---|---|---|---|"]
    for job in reversed(jobs[-10:]):
        how = "resume" if job.resume else "new run"
        rows.append(f"| {job.id} | {views.escape(job.name)} | {job.status.value} | {how} |")
    return "\n".join(rows)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return -1
