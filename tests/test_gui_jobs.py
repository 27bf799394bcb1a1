"""The GUI's job runner (gui/jobs.py) against a fake trainer with the real
CLI's arguments, files and messages: progress, queue, stop, resume, and
every way a run can end, explained in words."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from core import run_lock
from gui.cli_runs import error_message, explain_failure
from gui.job_outcome import child_outcome, done_message, stopped_message
from gui.jobs import Job, JobRunner, Status
from gui.monitor import Monitor
from gui.run_files import MetricsReader, log_lines, tqdm_total

FAKE = [sys.executable, str(Path(__file__).with_name("gui_fake_trainer.py"))]


def make_runner(tmp_path: Path, mode: str = "ok", step_seconds: float = 0.02) -> JobRunner:
    env = {"FAKE_TRAINER_MODE": mode, "FAKE_STEP_SECONDS": str(step_seconds)}
    return JobRunner(tmp_path / "jobs", trainer=FAKE, env=env)


def submit(runner: JobRunner, tmp_path: Path, name: str = "run", steps: int = 5,
           every: int = 2, extra: Sequence[str] = ()) -> Job:
    base = tmp_path / "base.toml"
    base.write_text('[model]\npath = "demo"\n[dataset]\npath = "demo"\n')
    out = tmp_path / "outputs" / name
    overrides = [f"train.steps={steps}", f"output.name={name}", f"output.dir={out}",
                 f"sample.every_n_steps={every}", 'sample.prompts=["a cat"]', *extra]
    return runner.submit(str(base), overrides, str(out), name, steps)


def wait_for(condition, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def test_a_run_reports_progress_and_finishes(tmp_path):
    runner = make_runner(tmp_path)
    job = runner.wait(submit(runner, tmp_path).id, 60)
    assert job.status is Status.DONE, job.message
    assert job.message == "Finished: 5 steps. The adapter is in the Export tab."
    assert Path(job.final_file).is_file()
    view = Monitor(runner).view()
    assert [m.step for m in view["metrics"]] == [1, 2, 3, 4, 5]
    assert "Step 5 / 5" in view["progress"] and "Finished" in view["status"]
    assert [Path(p).name for p in view["samples"]] == ["step000004-0.png", "step000002-0.png"]
    assert view["log"].splitlines()[-1].startswith("done: 5 steps")
    # The job's record, for an app started later.
    saved = json.loads((Path(job.folder) / "job.json").read_text())
    assert saved["status"] == "done" and saved["overrides"] == job.overrides


def test_stop_saves_and_resume_continues_with_the_same_config(tmp_path):
    runner = make_runner(tmp_path, step_seconds=0.15)
    first = submit(runner, tmp_path, steps=40)
    reader = MetricsReader(Path(first.output_dir) / "metrics.jsonl")
    wait_for(lambda: len(reader.read()) >= 2)
    assert runner.stop(first.id).status is Status.STOPPING
    first = runner.wait(first.id, 30)
    assert first.status is Status.STOPPED, first.message
    stopped_at = len(reader.read())
    assert f"Stopped after step {stopped_at}" in first.message and stopped_at < 40
    second = runner.resume(first.id)
    assert second.arguments() == [*first.arguments(), "--resume"]
    assert runner.wait(second.id, 60).status is Status.DONE
    # metrics.jsonl was rewritten on resume (new inode): read anew, no gap, no repeat.
    assert [m.step for m in reader.read()] == list(range(1, 41))


def test_one_job_at_a_time_later_ones_queued(tmp_path):
    runner = make_runner(tmp_path, step_seconds=0.05)
    first, second = submit(runner, tmp_path, "a", steps=6), submit(runner, tmp_path, "b", steps=2)
    assert runner.get(first.id).status is Status.RUNNING
    assert runner.get(second.id).status is Status.QUEUED
    assert runner.current().id == first.id
    done_a, done_b = runner.wait(first.id, 60), runner.wait(second.id, 60)
    assert done_a.status is done_b.status is Status.DONE
    assert done_a.finished_at <= done_b.started_at


def test_stop_takes_a_queued_job_off_the_queue(tmp_path):
    runner = make_runner(tmp_path, step_seconds=0.05)
    first, second = submit(runner, tmp_path, "a", steps=6), submit(runner, tmp_path, "b")
    assert runner.stop(second.id).status is Status.CANCELLED
    assert runner.wait(first.id, 60).status is Status.DONE
    assert runner.get(second.id).started_at is None


@pytest.mark.parametrize(("mode", "expected"), [
    ("error", "dataset.path = demo has no usable image;\nfix the dataset and start again."),
    ("crash", "The trainer was killed (SIGKILL) without a word: most often the system ran out "
              "of memory"),
    ("oom", "The trainer ran out of memory (RuntimeError: CUDA out of memory. Tried to allocate "
            "2.00 GiB). Lower train.batch_size"),
])  # fmt: skip
def test_failures_are_explained_in_words(tmp_path, mode, expected):
    runner = make_runner(tmp_path, mode=mode)
    job = runner.wait(submit(runner, tmp_path).id, 60)
    assert job.status is Status.FAILED
    assert job.message.startswith(expected), job.message
    assert "Traceback" not in job.message and "exit code" not in job.message
    assert "**Problem:**" in Monitor(runner).view()["status"]


def test_a_restarted_app_settles_jobs_whose_trainer_ended_while_it_was_away(tmp_path):
    runner = make_runner(tmp_path)
    finished = runner.wait(submit(runner, tmp_path, "finished").id, 60)
    killed = submit(runner, tmp_path, "killed", steps=40)
    wait_for(lambda: len(MetricsReader(Path(killed.output_dir) / "metrics.jsonl").read()) >= 2)
    killed = runner.wait(runner.stop(killed.id).id, 30)
    # As an app killed mid-run leaves them: the records say running; one
    # trainer finished on its own, the other was killed (kill -9) after its
    # last state save.
    for job in (finished, killed):
        record = Path(job.folder) / "job.json"
        record.write_text(record.read_text().replace(f'"{job.status.value}"', '"running"'))
    status = Path(killed.output_dir) / "status.json"
    status.write_text(status.read_text().replace('"stopped"', '"training"'))
    step = json.loads(status.read_text())["step"]
    again = make_runner(tmp_path)
    done, interrupted = again.jobs()
    assert done.status is Status.DONE and done.message.startswith("Finished: 5 steps")
    assert done.final_file == finished.final_file
    assert interrupted.status is Status.INTERRUPTED
    assert interrupted.message.startswith(f"The trainer (process {killed.pid}) ended at step "
                                          f"{step} without finishing")
    assert "Press Resume" in interrupted.message
    assert [j.id for j in again.resumable()] == [interrupted.id]
    resumed = again.resume(interrupted.id)
    assert resumed.resume is True and again.wait(resumed.id, 60).status is Status.DONE


def test_job_records_of_older_and_newer_versions_load(tmp_path):
    old = {"id": 3, "name": "old", "config": "base.toml", "overrides": ["train.steps=4"],
           "output_dir": str(tmp_path / "out"), "status": "stopped", "message": "m",
           "folder": "/moved/away/0003", "a_field_from_a_later_version": 1}
    (tmp_path / "jobs" / "0003").mkdir(parents=True)
    (tmp_path / "jobs" / "0003" / "job.json").write_text(json.dumps(old))
    (tmp_path / "jobs" / "0004").mkdir()
    (tmp_path / "jobs" / "0004" / "job.json").write_text('{"id": 4, "na')  # cut off
    (job,) = make_runner(tmp_path).jobs()
    assert (job.id, job.status, job.pid) == (3, Status.STOPPED, None)
    assert job.folder == str(tmp_path / "jobs" / "0003")  # where it is now


def test_how_a_child_ended_comes_from_its_status_json_not_its_output(tmp_path):
    me = os.getpid()
    job = Job(id=1, name="run", config="c.toml", overrides=[], output_dir=str(tmp_path),
              status=Status.RUNNING, started_at=time.time() - 5, pid=me,
              pid_start=run_lock.process_start_time(me), host=socket.gethostname())
    misleading = "done: 9 steps, adapter written to /elsewhere.safetensors\n"
    run_lock.write_status(tmp_path, run_lock.STOPPED, 3, 9)
    assert child_outcome(job, 0, misleading) == (Status.STOPPED, stopped_message(3), "")
    run_lock.write_status(tmp_path, run_lock.FAILED, 3, 9, error="The disk is full.")
    assert child_outcome(job, 2, "error: (cut off)") == (Status.FAILED, "The disk is full.", "")
    final = tmp_path / "run.safetensors"
    run_lock.write_status(tmp_path, run_lock.DONE, 9, 9, files={"final": str(final)})
    assert child_outcome(job, 0, "") == (Status.DONE, done_message(9), str(final))
    # Stop clicked as the run finished: the signal met a trainer on its way out.
    stopping = dataclasses.replace(job, status=Status.STOPPING)
    assert child_outcome(stopping, -15, "") == (Status.DONE, done_message(9), str(final))
    run_lock.write_status(tmp_path, run_lock.STARTING, 0, 9)
    assert child_outcome(stopping, -15, "")[1].startswith("Stopped while starting up")
    run_lock.write_status(tmp_path, run_lock.DONE, 9, 9, files={"final": str(final)})
    # Written by another process (an earlier run in the folder): not this job's
    # word. A clean exit then means done only if the final adapter is there.
    other = dataclasses.replace(job, pid=me + 1)
    assert child_outcome(other, 0, misleading) == (Status.STOPPED, stopped_message(None), "")
    final.write_bytes(b"")
    assert child_outcome(other, 0, "") == (Status.DONE, done_message("all"), str(final))


# --- explaining how a child ended (gui/cli_runs.py), as a table --------------
BAR = "\rtraining:  10%|#         | 3/30 [00:04<00:39,  1.45s/it, loss=1.1, lr=1.0e-03]"


@pytest.mark.parametrize(("returncode", "output", "expected"), [
    (2, "noise\nerror: model.path = /x does not exist.\n", "model.path = /x does not exist."),
    (2, BAR + "error: The loss became nan at step 4\n", "The loss became nan at step 4"),
    (2, "error: Dataset /d\nerror    a.png: truncated\nNot trainable\n",
     "Dataset /d\nerror    a.png: truncated\nNot trainable"),
    (-signal.SIGKILL, BAR, "The trainer was killed (SIGKILL) without a word"),
    (137, "", "The trainer was killed (SIGKILL) without a word"),
    (-signal.SIGHUP, BAR, "The trainer was ended by signal SIGHUP from outside this app."),
    (1, "Traceback (most recent call last):\n  File x\ntorch.OutOfMemoryError: CUDA out of "
        "memory.\n", "The trainer ran out of memory (torch.OutOfMemoryError: CUDA out of memory.)"),
    (1, "Traceback (most recent call last):\n  File x\nKeyError: 'conv_in'\n",
     "The trainer crashed with KeyError: 'conv_in'. This is a bug"),
    (3, "", "The trainer ended with exit status 3 without saying why"),
])  # fmt: skip
def test_explain_failure(returncode, output, expected):
    assert explain_failure(returncode, output, "The trainer").startswith(expected)


def test_error_message_ignores_words_inside_lines():
    assert error_message("the error: is here\n") is None


def test_log_view_shows_the_last_redraw_of_each_line():
    text = "Caching latents: 100%\n" + BAR + BAR.replace("3/30", "4/30") + "\nnext\n"
    assert log_lines(text) == ["Caching latents: 100%", BAR[1:].replace("3/30", "4/30"), "next"]
    assert tqdm_total(text) == 30


def test_a_line_that_is_not_a_metric_is_left_out_of_the_view(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo\x00\x00\n[]\n{"loss": 1}\n'
                    '{"step": 3, "loss": 0.25}\n')
    assert [(m.step, m.loss) for m in MetricsReader(path).read()] == [(1, 0.5), (3, 0.25)]
