"""Trainers that outlive the app: an app killed with SIGKILL leaves its
trainer training; the next app follows it (progress, Stop, the queue), marks
it interrupted when it dies, resumes that job, and never starts a second
trainer on a folder whose trainer is alive. The first tests use the fake
trainer under a JobRunner in a child process (the "app" that is killed); the
last drives `python app.py` and the real trainer on the demo model."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core import run_lock
from core.errors import UserError
from gui.form import KEYS
from gui.jobs import JobRunner, Status
from gui.monitor import Monitor
from gui.presets import saved_step
from tests.test_gui_app import form_values, free_port, poll, steps_in
from tests.test_gui_jobs import FAKE, make_runner, submit, wait_for

REPO = Path(__file__).resolve().parents[1]
STEP_SECONDS = 0.05
# An app that starts a job (and queues a second one), then waits to be killed.
FIRST_APP = """
import sys, time
from pathlib import Path
from tests.test_gui_jobs import make_runner, submit
root = Path(sys.argv[1])
runner = make_runner(root, step_seconds=float(sys.argv[2]))
job = submit(runner, root, "orphan", steps=int(sys.argv[3]), every=0,
             extra=["train.save_state_every_n_steps=2"])
submit(runner, root, "queued", steps=2, every=0)
print(job.id, job.pid, flush=True)
time.sleep(600)
"""


def end_trainers(trainers: list[run_lock.Owner]) -> None:
    """Trainers that are not our children, if they still run (and only they:
    their pids may belong to other processes by now)."""
    for owner in trainers:
        if run_lock.is_alive(owner):
            with contextlib.suppress(ProcessLookupError):
                os.kill(owner.pid, signal.SIGKILL)


def trainer_of(pid: int) -> run_lock.Owner:
    return run_lock.Owner(pid, run_lock.process_start_time(pid), socket.gethostname(), 0.0)


@pytest.fixture
def orphans():
    """Trainers left behind by a killed app, ended however the test ends."""
    trainers: list[run_lock.Owner] = []
    yield trainers
    end_trainers(trainers)


def kill_the_app_mid_run(tmp_path: Path, steps: int, orphans: list) -> tuple[int, int]:
    """(job id, trainer pid) after the app that started the trainer died by SIGKILL."""
    app = subprocess.Popen([sys.executable, "-c", FIRST_APP, str(tmp_path), str(STEP_SECONDS),
                            str(steps)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                           env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    try:
        job_id, pid = map(int, app.stdout.readline().split())
        orphans.append(trainer_of(pid))
        wait_for(lambda: len(steps_in(tmp_path / "outputs" / "orphan")) >= 3)
    finally:
        app.kill()
        app.wait()
    os.kill(pid, 0)  # the trainer lives on
    return job_id, pid


def progress_moves(runner: JobRunner) -> None:
    monitor = Monitor(runner)
    first = monitor.view()["progress"]
    assert first.startswith("**Step ") and "Training" in monitor.view()["status"]
    wait_for(lambda: monitor.view()["progress"].split("**")[1] != first.split("**")[1])


def test_a_restarted_app_follows_the_trainer_stops_it_and_queues_behind_it(tmp_path, orphans):
    job_id, pid = kill_the_app_mid_run(tmp_path, 200, orphans)
    runner = make_runner(tmp_path, step_seconds=STEP_SECONDS)
    job, queued = runner.get(job_id), runner.get(job_id + 1)
    assert job.status is Status.RUNNING and f"follows its trainer (process {pid})" in job.message
    assert queued.status is Status.CANCELLED and "never ran" in queued.message
    with pytest.raises(UserError, match=f"Job {queued.id} \\(queued\\) never started, so it has "
                                        "no saved state to resume; press Start"):
        runner.resume(queued.id)
    progress_moves(runner)
    later = submit(runner, tmp_path, "later", steps=2)
    assert later.status is Status.QUEUED  # one trainer at a time, the followed one included
    assert runner.stop(job.id).status is Status.STOPPING
    job = runner.wait(job.id, 30)
    done = steps_in(Path(job.output_dir))
    assert job.status is Status.STOPPED and job.message.startswith(
        f"Stopped after step {done[-1]}; the state is saved. Press Resume")
    assert runner.wait(later.id, 30).status is Status.DONE
    assert runner.get(later.id).started_at >= job.finished_at


def test_a_followed_trainer_that_is_killed_is_interrupted_and_resumes_that_job(tmp_path,
                                                                              orphans):
    job_id, pid = kill_the_app_mid_run(tmp_path, 60, orphans)
    runner = make_runner(tmp_path, step_seconds=STEP_SECONDS)
    progress_moves(runner)
    os.kill(pid, signal.SIGKILL)
    job = runner.wait(job_id, 30)
    assert job.status is Status.INTERRUPTED
    assert job.message.startswith(f"The trainer (process {pid}) ended at step ")
    # The latest job is the one that never ran; Resume offers the interrupted one.
    assert runner.latest().id == job_id + 1
    assert [j.id for j in runner.resumable()] == [job_id]
    resumed = runner.wait(runner.resume(job_id).id, 60)
    assert resumed.status is Status.DONE and resumed.output_dir == job.output_dir
    assert steps_in(Path(job.output_dir)) == list(range(1, 61))
    assert Path(resumed.final_file).is_file()


def test_resume_and_start_refuse_while_a_trainer_runs_in_the_folder(tmp_path):
    runner = make_runner(tmp_path, step_seconds=STEP_SECONDS)
    job = submit(runner, tmp_path, "busy", steps=80, every=0)
    folder = Path(job.output_dir)
    wait_for(lambda: len(steps_in(folder)) >= 2)
    runner.stop(job.id)
    assert runner.wait(job.id, 30).status is Status.STOPPED
    # Someone resumes the same run in a terminal.
    outside = subprocess.Popen([*FAKE, *runner.get(job.id).arguments(), "--resume"], cwd=REPO,
                               env={**os.environ, "PYTHONPATH": str(REPO),
                                    "FAKE_STEP_SECONDS": str(STEP_SECONDS)})  # fmt: skip
    try:
        wait_for(lambda: (run_lock.live_owner(folder) or run_lock.Owner(0, "", "", 0)).pid
                 == outside.pid)
        refusal = f"A trainer is already running in {folder} \\(process {outside.pid} on "
        with pytest.raises(UserError, match=refusal):
            runner.resume(job.id)
        with pytest.raises(UserError, match=refusal):
            submit(runner, tmp_path, "busy", steps=80, every=0)
        assert [j.id for j in runner.jobs()] == [job.id]  # nothing started
    finally:
        outside.send_signal(signal.SIGTERM)
        outside.wait(30)
    stopped_at = steps_in(folder)
    assert stopped_at == list(range(1, len(stopped_at) + 1))
    assert runner.wait(runner.resume(job.id).id, 60).status is Status.DONE
    assert steps_in(folder) == list(range(1, 81))


# --- python app.py and the real trainer ----------------------------------------
STEPS = 40  # a few seconds of training on the demo model


class Apps:
    """`python app.py` processes on one data folder, each in a process group
    of its own as a terminal runs it, and the trainers they start."""

    def __init__(self, tmp_path: Path):
        self.data, self.log = tmp_path / "data", tmp_path / "apps.log"
        # One thread each: two OpenMP threads per process on a busy 2-core
        # machine can spin against each other and slow every step a hundredfold.
        self.env = {**os.environ, "LORA_TRAINER_CACHE": str(tmp_path / "cache"),
                    "OMP_NUM_THREADS": "1"}
        self.processes: list[subprocess.Popen] = []
        self.trainers: list[run_lock.Owner] = []  # not our children

    def serve(self) -> tuple[subprocess.Popen, object]:
        from gradio_client import Client

        port = free_port()
        with open(self.log, "ab") as out:
            app = subprocess.Popen([sys.executable, "app.py", "--data-dir", str(self.data),
                                    "--port", str(port)], cwd=REPO, env=self.env, stdout=out,
                                   stderr=out, start_new_session=True)  # fmt: skip
        self.processes.append(app)
        deadline = time.monotonic() + 120
        while True:
            try:
                return app, Client(f"http://127.0.0.1:{port}/", verbose=False)
            except Exception:  # not serving yet
                assert app.poll() is None and time.monotonic() < deadline, self.log.read_text()
                time.sleep(0.3)

    def job(self, job_id: int) -> dict:
        record = json.loads((self.data / "jobs" / f"{job_id:04d}" / "job.json").read_text())
        if record.get("pid"):
            self.trainers.append(run_lock.Owner(record["pid"], record["pid_start"],
                                                record["host"], 0.0))
        return record

    def close(self) -> None:
        for process in self.processes:
            process.kill()
            process.wait()
        end_trainers(self.trainers)


def progress_step(shown: tuple) -> int:
    return int(shown[1].split("**Step ")[1].split(" ")[0])


def steps_done(folder: Path) -> int:
    return max(steps_in(folder), default=0)


def start_then_kill_the_app(apps: Apps, model: Path) -> tuple[list, dict]:
    """The form's values and job 1, whose app died (SIGKILL) while it trained."""
    first, client = apps.serve()
    values = form_values(client, model__path=str(model / "diffusers"), train__steps=STEPS,
                         train__batch_size=1, sample__every_n_steps=0,
                         train__save_state_every_n_steps=2, output__name="orphan")
    assert "Job 1 started" in client.predict(None, *values, api_name="/start")
    other = [*values]
    other[KEYS.index("output.name")] = "waiting"
    assert "queued" in client.predict(None, *other, api_name="/start")
    job = apps.job(1)
    wait_for(lambda: (saved_step(Path(job["output_dir"])) or 0) >= 2, timeout=180)
    # Paused while the next app starts, so that however slow this machine is
    # the run cannot end before it is watched; it stays alive throughout.
    os.kill(job["pid"], signal.SIGSTOP)
    first.kill()
    first.wait()
    return values, job


def follow_then_kill_the_trainer(client, values: list, job: dict) -> None:
    pid, out = job["pid"], job["output_dir"]
    shown = poll(client, "Training")
    assert f"follows its trainer (process {pid}) again" in shown[0]
    before = progress_step(shown)
    busy = f"**Problem:** Job 1 is still training in {out} (process {pid}); a second trainer"
    assert client.predict(1, *values, api_name="/resume").startswith(busy)
    assert client.predict(None, *values, api_name="/start").startswith(busy)
    os.kill(pid, signal.SIGCONT)
    wait_for(lambda: progress_step(poll(client, "Step", where=1)) > before)
    os.kill(pid, signal.SIGKILL)
    shown = poll(client, "Interrupted")
    assert f"The trainer (process {pid}) ended at step" in shown[0]
    assert shown[6] == 1  # the picker: the interrupted job, not the latest one (never ran)


def resume_then_press_ctrl_c(apps: Apps, app, client, values: list, out: Path) -> None:
    killed_at = steps_done(out)
    assert "Job 3 resumes orphan" in client.predict(1, *values, api_name="/resume")
    pid = apps.job(3)["pid"]
    wait_for(lambda: steps_done(out) > killed_at, timeout=180)
    # Ctrl-C in the app's terminal reaches its process group, not the
    # trainer's session: the app stops the trainer (SIGTERM) and waits for
    # it. The trainer is paused until then, so it cannot finish first.
    os.kill(pid, signal.SIGSTOP)
    os.killpg(app.pid, signal.SIGINT)
    wait_for(lambda: apps.job(3)["status"] == "stopping")
    os.kill(pid, signal.SIGCONT)
    assert app.wait(timeout=120) == 0
    job = apps.job(3)
    assert job["status"] == "stopped" and job["message"].startswith("Stopped after step")
    assert not run_lock.is_alive(apps.trainers[-1])


def test_a_gui_killed_mid_run_is_followed_by_the_next_which_resumes_it_bit_exact(
        demo_model_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    apps = Apps(tmp_path)
    try:
        values, job = start_then_kill_the_app(apps, demo_model_dir)
        out = Path(job["output_dir"])
        # The same run, never interrupted, for the comparison at the end.
        with open(tmp_path / "reference.log", "wb") as reference_log:
            reference = subprocess.Popen(
                [sys.executable, "-m", "trainer", "train", job["config"],
                 *[arg for o in job["overrides"] for arg in ("--set", o)],
                 "--set", f"output.dir={tmp_path / 'reference'}"],
                cwd=REPO, env=apps.env, stdout=reference_log, stderr=subprocess.STDOUT)
        apps.processes.append(reference)
        second, client = apps.serve()
        follow_then_kill_the_trainer(client, values, job)
        resume_then_press_ctrl_c(apps, second, client, values, out)
        _, client = apps.serve()
        assert poll(client, "Stopped")[6] == 3
        assert "Job 4 resumes orphan" in client.predict(3, *values, api_name="/resume")
        assert f"Step {STEPS} / {STEPS}" in poll(client, "Finished", timeout=180)[1]
        assert reference.wait(timeout=180) == 0, (tmp_path / "reference.log").read_text()
    finally:
        apps.close()
    assert steps_in(out) == list(range(1, STEPS + 1))
    resumed = load_file(out / "orphan.safetensors")
    uninterrupted = load_file(tmp_path / "reference" / "orphan.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for key, tensor in uninterrupted.items():
        assert torch.equal(resumed[key], tensor), key
    assert sorted(p.name for p in (apps.data / "jobs").iterdir()) == ["0001", "0002", "0003",
                                                                      "0004"]
