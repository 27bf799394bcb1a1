"""The run folder's edges: one trainer at a time, status.json through a run,
leftovers of killed saves, --resume of a finished run, Ctrl-C while starting."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from core.errors import UserError
from core.run_lock import LOCK_NAME, read_status
from tests.test_train import REPO, config_for, four_images, metrics, overrides  # noqa: F401
from trainer.cli import NOTHING_TRAINED
from trainer.run_guard import RunAlreadyFinished
from trainer.train import run

PRESET = REPO / "presets" / "sd15-character-lora.toml"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def trainer(tmp_path: Path, *args: str, log: str = "trainer") -> subprocess.Popen:
    """`python -m trainer train` with its output in files: a pipe nobody reads
    would block a trainer that runs for a while."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out, err = open(tmp_path / f"{log}.out", "w"), open(tmp_path / f"{log}.err", "w")
    process = subprocess.Popen([sys.executable, "-m", "trainer", "train", str(PRESET), *args],
                               cwd=REPO, env=env, stdout=out, stderr=err, text=True)
    out.close()
    err.close()
    return process


def output_of(tmp_path: Path, log: str = "trainer") -> tuple[str, str]:
    return (tmp_path / f"{log}.out").read_text(), (tmp_path / f"{log}.err").read_text()


def wait_for(condition, timeout: float = 120, every: float = 0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(every)
    raise AssertionError("timed out")


def contents(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in skip}  # fmt: skip


def in_state(folder: Path, *states: str):
    return lambda: (status := read_status(folder)) is not None and status["state"] in states


def test_a_second_trainer_refuses_a_folder_in_use_and_touches_nothing(
    demo_model_dir, four_images, tmp_path  # noqa: F811
):
    out = tmp_path / "run"
    args = overrides(demo_model_dir, four_images, out, **{"train.steps": 2000})
    first = trainer(tmp_path, *args, log="first")
    try:
        wait_for(lambda: in_state(out, "training")() and read_status(out)["step"] >= 1)
        # What a killed save leaves: the second trainer must not take it for its own.
        tempfile.mkstemp(dir=out, prefix=".test.safetensors.", suffix=".tmp")
        second = trainer(tmp_path, *args, log="second")
        assert second.wait(timeout=120) == 2
        _, err = output_of(tmp_path, "second")
        assert f"Another trainer (process {first.pid} on " in err, err
        assert f"kill -TERM {first.pid}" in err and "Traceback" not in err
        assert first.poll() is None
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == first.pid
        assert [p.name for p in out.glob(".test.safetensors.*.tmp")]
        assert read_status(out)["pid"] == first.pid
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)
    assert first.returncode == 0, output_of(tmp_path, "first")[1][-2000:]
    steps = [m["step"] for m in metrics(out)]
    assert steps == list(range(1, len(steps) + 1))  # one writer: no interleaved lines
    status = read_status(out)
    assert (status["state"], status["step"], status["total"]) == ("stopped", len(steps), 2000)
    assert status["files"] == {"state": str(out / "state" / f"state-{len(steps):08d}")}
    assert not (out / LOCK_NAME).exists()


class StatusLog:
    """Every status a run writes, in order (the file keeps only the last)."""

    def __init__(self, monkeypatch):
        import trainer.run_guard as guard

        self.records: list[tuple] = []
        real = guard.write_status

        def spy(folder, state, step, total, error="", files=None):
            self.records.append((state, step, total, error, dict(files or {})))
            real(folder, state, step, total, error, files)

        monkeypatch.setattr(guard, "write_status", spy)
        monkeypatch.setattr(guard, "STATUS_EVERY_S", 1e9)  # the forced writes only

    def states(self) -> list[tuple]:
        return [record[:3] for record in self.records]


def test_status_follows_a_stop_a_resume_to_the_end_and_failures(
    demo_model_dir, four_images, tmp_path, monkeypatch  # noqa: F811
):
    log = StatusLog(monkeypatch)
    config = config_for(demo_model_dir, four_images, tmp_path / "run",
                        **{"train.steps": 6, "train.save_state_every_n_steps": 2})  # fmt: skip
    state = tmp_path / "run" / "state"
    run(config, stop_at_step=3)
    assert log.states() == [("starting", 0, 6), ("training", 0, 6), ("training", 2, 6),
                            ("training", 3, 6), ("stopped", 3, 6)]  # fmt: skip
    assert log.records[-1][4] == {"state": str(state / "state-00000003")}
    assert read_status(tmp_path / "run")["state"] == "stopped"
    assert not (tmp_path / "run" / LOCK_NAME).exists()

    log.records.clear()
    run(config, resume=True)
    # The last step's state is saved after the final file, as the run ends.
    assert log.states() == [("starting", 3, 6), ("training", 3, 6), ("training", 4, 6),
                            ("done", 6, 6)]  # fmt: skip
    assert log.records[-1][4] == {"final": str(tmp_path / "run" / "test.safetensors"),
                                  "state": str(state / "state-00000006")}  # fmt: skip
    on_disk = read_status(tmp_path / "run")
    assert (on_disk["state"], on_disk["step"], on_disk["files"]) == ("done", 6, log.records[-1][4])

    log.records.clear()
    diverging = config_for(demo_model_dir, four_images, tmp_path / "diverged",
                           **{"train.unet_lr": 1e30, "train.max_grad_norm": 0})  # fmt: skip
    with pytest.raises(UserError, match="training diverged") as failure:
        run(diverging)
    status = read_status(tmp_path / "diverged")
    assert status["state"] == "failed" and status["error"] == str(failure.value)

    def bug(*args):
        raise ValueError("an unexpected bug\nwith a second line")

    monkeypatch.setattr("trainer.train.training_loss", bug)
    with pytest.raises(ValueError):
        run(config_for(demo_model_dir, four_images, tmp_path / "bug"))
    status = read_status(tmp_path / "bug")
    assert (status["state"], status["error"]) == ("failed", "ValueError: an unexpected bug")
    assert not (tmp_path / "bug" / LOCK_NAME).exists()


def test_leftovers_of_killed_saves_are_removed_when_the_run_starts_again(
    demo_model_dir, four_images, tmp_path  # noqa: F811
):
    out = tmp_path / "run"
    config = config_for(demo_model_dir, four_images, out, **{"train.steps": 4})
    run(config, stop_at_step=2)
    # What kill -9 in the middle of each kind of save leaves behind.
    staging = Path(tempfile.mkdtemp(dir=out / "state", prefix=".state-00000004."))
    (staging / "adapter.safetensors").write_bytes(b"half a file")
    (out / "samples").mkdir()
    tmp_files = [
        tempfile.mkstemp(dir=out, prefix=".test.safetensors.", suffix=".tmp")[1],
        tempfile.mkstemp(dir=out, prefix=".metrics.jsonl.", suffix=".tmp")[1],
        tempfile.mkstemp(dir=out / "samples", prefix=".step000004-0.png.", suffix=".tmp")[1],
    ]
    mine = [out / "notes.txt", out / "samples" / "keep.tmp"]
    for path in mine:
        path.write_text("the user's")
    run(config, resume=True)
    assert not staging.exists() and not any(Path(p).exists() for p in tmp_files)
    assert sorted(p.name for p in (out / "state").iterdir()) == ["state-00000002", "state-00000004"]
    assert all(path.read_text() == "the user's" for path in mine)


def test_resume_of_a_finished_run_refuses_and_changes_no_byte(
    demo_model_dir, four_images, tmp_path  # noqa: F811
):
    out = tmp_path / "run"
    run(config_for(demo_model_dir, four_images, out,
                   **{"train.steps": 4, "output.save_every_n_steps": 2}))  # fmt: skip
    before = contents(out)
    assert {"config.toml", "metrics.jsonl", "status.json", "test.safetensors",
            "test-step000002.safetensors"} <= set(before)  # fmt: skip
    assert any(name.startswith("tensorboard/") for name in before)
    cli = trainer(tmp_path, *overrides(demo_model_dir, four_images, out, **{"train.steps": 4}),
                  "--resume")  # fmt: skip
    assert cli.wait(timeout=120) == 2
    _, err = output_of(tmp_path)
    assert "already finished" in err and "state-00000004) is at step 4 of 4" in err, err
    assert "raise train.steps above 4" in err and "Traceback" not in err
    assert contents(out) == before
    # Refused before the dataset is scanned and the model loaded: neither exists here.
    gone = tmp_path / "gone"
    with pytest.raises(RunAlreadyFinished, match="at step 4 of 4"):
        run(config_for(gone, gone, out, **{"train.steps": 4}), resume=True)
    assert contents(out) == before


def test_resume_of_a_run_finished_by_epochs_refuses_until_the_epochs_are_raised(
    demo_model_dir, four_images, tmp_path  # noqa: F811
):
    out = tmp_path / "run"
    # Four images repeated 4 times, 2 a batch: 8 steps an epoch.
    epochs = {"train.steps": 0, "train.epochs": 1}
    assert run(config_for(demo_model_dir, four_images, out, **epochs)).steps_done == 8
    before = contents(out)
    # The total needs the dataset, not the model (which is not there).
    with pytest.raises(RunAlreadyFinished, match=r"at step 8 of 8 \(1 epochs\).*train.epochs"):
        run(config_for(tmp_path / "gone", four_images, out, **epochs), resume=True)
    assert contents(out) == before
    more = run(config_for(demo_model_dir, four_images, out, **{**epochs, "train.epochs": 2}),
               resume=True)  # fmt: skip
    assert more.steps_done == 16 and [m["step"] for m in metrics(out)] == list(range(1, 17))


def torch_is_loading(pid: int) -> bool:
    """The process is importing torch, well inside the CLI's own code."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def test_ctrl_c_while_importing_exits_quietly_having_written_nothing(
    demo_model_dir, four_images, tmp_path  # noqa: F811
):
    out = tmp_path / "run"
    process = trainer(tmp_path, *overrides(demo_model_dir, four_images, out))
    wait_for(lambda: torch_is_loading(process.pid) or process.poll() is not None, every=0.002)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 130, output_of(tmp_path)  # what it said instead
    stdout, stderr = output_of(tmp_path)
    assert stderr.strip() == NOTHING_TRAINED and stdout == ""
    assert not out.exists()


def test_ctrl_c_while_the_model_loads_exits_quietly_and_changes_nothing(
    demo_model_dir, four_images, tmp_path  # noqa: F811
):
    out = tmp_path / "run"
    run(config_for(demo_model_dir, four_images, out, **{"train.steps": 8}), stop_at_step=2)
    before = contents(out, skip=("status.json",))
    process = trainer(tmp_path, *overrides(demo_model_dir, four_images, out,
                                           **{"train.steps": 8}), "--resume")  # fmt: skip
    wait_for(in_state(out, "starting", "training", "done", "failed"))
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 130, output_of(tmp_path)  # what it said instead
    stdout, stderr = output_of(tmp_path)
    assert "Traceback" not in stderr and stderr.strip().endswith(NOTHING_TRAINED), stderr
    assert "stopped after" not in stdout
    assert contents(out, skip=("status.json",)) == before
    status = read_status(out)
    assert (status["state"], status["step"], status["pid"]) == ("stopped", 2, process.pid)
