"""The run-folder layout (core/run_layout.py): its names and how they parse,
and the GUI reading a folder that the real trainer wrote (state, step, files,
previews and how the run ended), with no log to read."""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from core import run_lock
from core.run_layout import (
    RunLayout,
    adapters_under,
    complete_states,
    is_preview,
    preview_position,
    state_dir_name,
    state_step,
)
from tests.test_train import config_for, four_images  # noqa: F401


def test_names_parse_back_and_sort_by_step():
    assert state_step(state_dir_name(120)) == 120
    assert state_dir_name(7) == "state-00000007"
    for other in (".state-00000007.abc", "state-", "state-12x", "state-00000007.old", "x-1"):
        assert state_step(other) is None, other
    run = RunLayout(Path("/runs/a"), "my-lora")
    assert run.final_file == Path("/runs/a/my-lora.safetensors")
    assert run.periodic_file(20) == Path("/runs/a/my-lora-step000020.safetensors")
    assert preview_position(run.preview(30, 1).name) == (30, 1)
    assert preview_position("step000030-1.jpg") is None
    assert (run.lock.name, run.status.name) == (run_lock.LOCK_NAME, run_lock.STATUS_NAME)


def test_states_and_previews_in_step_order_leftovers_ignored(tmp_path):
    run = RunLayout(tmp_path, "x")
    for step in (9, 100000000, 10):  # a ninth digit still sorts as a number
        run.state_dir(step).mkdir(parents=True)
    (run.state_root / ".state-00000011.tmpab").mkdir()  # a save that was killed
    (run.state_root / "state-00000012").write_text("")  # not a folder
    assert [state_step(p.name) for p in complete_states(run.state_root)] == [9, 10, 100000000]
    assert run.saved_step() == 100000000
    run.samples.mkdir()
    for step, index in ((2, 0), (10, 2), (10, 10), (4, 0)):
        run.preview(step, index).write_bytes(b"")
    (run.samples / "notes.png").write_bytes(b"")
    assert [p.name for p in run.newest_samples(limit=3)] == [
        "step000010-10.png", "step000010-2.png", "step000004-0.png"]
    assert is_preview(run.preview(2, 0)) and not is_preview(run.samples / "notes.png")
    assert not is_preview(tmp_path / "step000002-0.png")  # not in a samples folder


def test_holds_run_and_adapters_leave_training_states_out(tmp_path):
    empty = RunLayout(tmp_path / "empty")
    assert not empty.holds_run() and empty.saved_step() is None and empty.newest_samples() == []
    run = RunLayout(tmp_path / "runs" / "a", "a")
    run.state_dir(4).mkdir(parents=True)
    (run.state_dir(4) / "adapter.safetensors").write_bytes(b"")
    assert run.holds_run() and adapters_under(run.folder) == []
    run.final_file.write_bytes(b"")
    assert adapters_under(tmp_path / "runs") == [run.final_file]


# --- the GUI reading what the real trainer wrote ------------------------------
@pytest.fixture(scope="module")
def trained(demo_model_dir, four_images, tmp_path_factory):  # noqa: F811
    """A demo run stopped after step 2 (a copy of its folder kept), then
    resumed to the end (6 steps), with periodic saves every 2 steps and
    previews every 3 of two prompts; each as the GUI would record its job
    (this process was the trainer)."""
    import torch

    from trainer.train import run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("run") / "demo"
    config = config_for(demo_model_dir, four_images, out, **{
        "train.steps": 6, "output.save_every_n_steps": 2, "sample.every_n_steps": 3,
        "sample.prompts": ["a red square", "a blue circle"], "sample.steps": 2})
    me = {"pid": os.getpid(), "pid_start": run_lock.process_start_time(os.getpid()),
          "host": socket.gethostname()}
    try:
        started = time.time()
        run(config, stop_at_step=2)
        # The folder as the stopped run left it: the resume below rewrites it.
        snapshot = shutil.copytree(out, out.with_name("stopped"))
        stopped = SimpleNamespace(status=run_lock.read_status(snapshot),
                                  job=job_for(snapshot, started, me))
        started = time.time()
        run(config, resume=True)
        done = SimpleNamespace(status=run_lock.read_status(out), job=job_for(out, started, me))
    finally:
        torch.set_num_threads(threads)
    return SimpleNamespace(folder=out, stopped=stopped, done=done)


def job_for(folder: Path, started: float, trainer: dict):
    from gui.job_record import Job, Status

    return Job(id=1, name="test", config="x.toml", overrides=[], output_dir=str(folder),
               status=Status.RUNNING, started_at=started, **trainer)


def test_the_gui_reads_how_a_stopped_run_ended_from_status_json(trained):
    from gui.job_outcome import adopted_outcome, child_outcome
    from gui.job_record import Status

    assert trained.stopped.status["state"] == run_lock.STOPPED
    stopped = trained.stopped.job
    for outcome in (child_outcome(stopped, 0, ""), adopted_outcome(stopped, stopped.trainer, "")):
        status, message, final = outcome
        assert status is Status.STOPPED and message.startswith("Stopped after step 2;")
        assert final == ""
    run = RunLayout(Path(stopped.output_dir), "test")
    assert run.saved_step() == 2 and run.holds_run() and not run.final_file.exists()
    assert trained.stopped.status["files"]["state"].endswith(state_dir_name(2))
    # The same folder's status.json belongs to another process for a job whose
    # trainer was not this one: it is not taken for that job's end.
    other = job_for(trained.folder, 0.0, {"pid": 1, "pid_start": "1", "host": "elsewhere"})
    assert child_outcome(other, 3, "")[0] is Status.FAILED


def test_the_gui_reads_a_finished_run_state_step_files_and_previews(trained):
    from gui import exports, presets
    from gui.job_outcome import adopted_outcome, child_outcome
    from gui.job_record import Status
    from gui.run_files import MetricsReader

    run = RunLayout(trained.folder, "test")
    job = trained.done.job
    for outcome in (child_outcome(job, 0, ""), adopted_outcome(job, job.trainer, "")):
        assert outcome == (Status.DONE, "Finished: 6 steps. The adapter is in the Export tab.",
                           str(run.final_file))
    assert presets.saved_step(run.folder) == run.saved_step() == 6
    assert presets.holds_run(run.folder)
    # The trainer keeps the newest two states, named as the layout parses them.
    assert [state_step(p.name) for p in run.complete_states()] == [4, 6]
    assert trained.done.status["files"]["state"] == str(run.state_dir(6))
    periodic = [run.periodic_file(2), run.periodic_file(4)]
    assert all(p in run.periodic_files() for p in periodic)
    jobs = SimpleNamespace(jobs=lambda: [job])
    listed = exports.adapter_files(SimpleNamespace(outputs=run.folder.parent / "none"), jobs)
    assert sorted(listed) == sorted({run.final_file, *run.periodic_files()})
    assert not any(run.state_root in p.parents for p in listed)  # state adapters are no exports
    assert [p.name for p in run.newest_samples()] == [
        "step000006-1.png", "step000006-0.png", "step000003-1.png", "step000003-0.png"]
    assert [m.step for m in MetricsReader(run.metrics).read()] == [1, 2, 3, 4, 5, 6]
    assert run.config.is_file() and run.tensorboard.is_dir()


def test_the_live_view_of_a_finished_run_needs_no_log(trained, tmp_path):
    from gui.job_outcome import child_outcome
    from gui.job_record import save_job
    from gui.jobs import JobRunner
    from gui.monitor import Monitor

    job = dataclasses.replace(trained.done.job)  # the fixture's stays as it was
    job.total_steps = 0  # a run given in epochs: only the trainer knows the count
    job.status, job.message, job.final_file = child_outcome(job, 0, "")
    job.folder = str(tmp_path / "jobs" / "0001")
    Path(job.folder).mkdir(parents=True)
    save_job(job)  # no log.txt at all
    view = Monitor(JobRunner(tmp_path / "jobs", trainer=["false"])).view()
    assert view["status"].startswith("**Job 1 (test): Finished.**")
    assert view["progress"].startswith("**Step 6 / 6** · 100%")
    assert [Path(p).name for p in view["samples"]][:2] == ["step000006-1.png", "step000006-0.png"]
