"""A write that fails mid-run (a full disk) for each thing the trainer saves:
one clear message naming the file, what was saved before byte-identical, no
temporary leftovers, and --resume then finishes exactly as an uninterrupted run."""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from core.errors import UserError
from core.run_lock import LOCK_NAME, read_status
from tests.test_train import REPO, config_for, four_images, metrics, overrides  # noqa: F401
from trainer.train import run

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DISK_FULL = "No space left on device"
# Periodic adapters and states at steps 1 and 2, the final file at 3: each
# failure below hits step 2, when step 1's files are there to keep.
SETTINGS = {"train.steps": 3, "output.save_every_n_steps": 1}
PREVIEWS = {**SETTINGS, "sample.prompts": ["a shape"], "sample.every_n_steps": 2,
            "sample.steps": 1}  # fmt: skip


def kept_files(folder: Path) -> dict[str, bytes]:
    """What a user keeps: not the saves in progress (hidden), nor status.json,
    the lock and TensorBoard's buffered events, which change as the run ends."""
    kept = {}
    for path in sorted(folder.rglob("*")):
        parts = path.relative_to(folder).parts
        if (path.is_file() and path.name not in ("status.json", LOCK_NAME)
                and "tensorboard" not in parts and not any(p.startswith(".") for p in parts)):
            kept["/".join(parts)] = path.read_bytes()
    return kept


class Failure:
    """Makes the `on_call`-th write of one kind fail, noting what was on disk just before."""

    def __init__(self, out: Path, on_call: int):
        self.out, self.on_call, self.calls = out, on_call, 0
        self.before: dict[str, bytes] | None = None

    def due(self) -> bool:
        self.calls += 1
        if self.calls != self.on_call:
            return False
        self.before = kept_files(self.out)
        return True


def fail_state_adapter(monkeypatch, failure: Failure) -> None:
    import trainer.state

    real = trainer.state.save_file

    def save_file(tensors, filename, *args, **kwargs):
        if failure.due():
            Path(filename).write_bytes(b"\0" * 1000)  # as far as it got
            raise SafetensorError(
                "Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(trainer.state, "save_file", save_file)


def fail_state_training(monkeypatch, failure: Failure) -> None:
    real = torch.save

    def save(obj, f, *args, **kwargs):
        if Path(str(f)).name == "training.pt" and failure.due():
            Path(f).write_bytes(b"PK\3\4")
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


class FullDisk:
    """A file on a disk that fills up: part of the first write lands, then ENOSPC."""

    def __init__(self, file):
        self.file = file

    def write(self, data):
        self.file.write(bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, DISK_FULL)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def full_disk_for(name: str):
    """ENOSPC for the atomic write (core/atomic.py) of the file `name`:
    its temporary file, found by descriptor, is on a full disk."""

    def install(monkeypatch, failure: Failure) -> None:
        real = os.fdopen

        def fdopen(fd, *args, **kwargs):
            file = real(fd, *args, **kwargs)
            target = Path(os.readlink(f"/proc/self/fd/{fd}")).name
            if target.startswith(f".{name}.") and failure.due():
                return FullDisk(file)
            return file

        monkeypatch.setattr(os, "fdopen", fdopen)

    return install


def fail_metrics_line(monkeypatch, failure: Failure) -> None:
    """Half a line reaches metrics.jsonl, then the disk is full."""
    import trainer.run_outputs

    def fake_open(path, mode="r", *args, **kwargs):
        file = open(path, mode, *args, **kwargs)
        if Path(path).name == "metrics.jsonl" and "a" in mode and failure.due():
            return FullDisk(file)
        return file

    monkeypatch.setattr(trainer.run_outputs, "open", fake_open, raising=False)


CASES = {
    # name: (installs the failure, its call that fails, settings, first run stops at, message)
    "state adapter (SafetensorError)": (
        fail_state_adapter, 2, SETTINGS, None,
        r"Saving the training state to \S*state-00000002 failed \(SafetensorError: Error while "
        rf"serializing: I/O error: {DISK_FULL} \(os error 28\)\); the previous state is untouched"),
    "state training.pt (RuntimeError)": (
        fail_state_training, 2, SETTINGS, None,
        r"Saving the training state to \S*state-00000002 failed \(RuntimeError: "
        r"PytorchStreamWriter failed writing file data/0: file write failed\)"),
    "periodic adapter (ENOSPC)": (
        full_disk_for("test-step000002.safetensors"), 1, SETTINGS, None,
        rf"Writing \S*/test-step000002.safetensors failed \({DISK_FULL}\); the previous file, "
        "if any, is untouched"),
    "final adapter (ENOSPC)": (
        full_disk_for("test.safetensors"), 1, SETTINGS, None,
        rf"Writing \S*/test.safetensors failed \({DISK_FULL}\)"),
    "metrics line (ENOSPC)": (
        fail_metrics_line, 2, SETTINGS, None,
        rf"Writing \S*/metrics.jsonl failed \({DISK_FULL}\); what was written before is kept"),
    "config.toml of a resumed run (ENOSPC)": (
        full_disk_for("config.toml"), 1, SETTINGS, 1,
        rf"Writing \S*/config.toml failed \({DISK_FULL}\)"),
    "preview (ENOSPC)": (
        full_disk_for("step000002-0.png"), 1, PREVIEWS, None,
        rf"Writing \S*/samples/step000002-0.png failed \({DISK_FULL}\)"),
}


@pytest.fixture(scope="module")
def uninterrupted(demo_model_dir, four_images, tmp_path_factory):  # noqa: F811
    """The adapter and losses of the run without a failure. Previews draw
    their own noise: with or without them, training is the same."""
    out = tmp_path_factory.mktemp("uninterrupted")
    run(config_for(demo_model_dir, four_images, out, **SETTINGS))
    return load_file(out / "test.safetensors"), [m["loss"] for m in metrics(out)]


@pytest.mark.parametrize("case", CASES)
def test_a_failed_write_is_one_message_keeps_earlier_files_and_resumes_exactly(
    case, uninterrupted, demo_model_dir, four_images, tmp_path, monkeypatch  # noqa: F811
):
    install, on_call, settings, first_stop, message = CASES[case]
    out = tmp_path / "run"
    config = config_for(demo_model_dir, four_images, out, **settings)
    if first_stop:
        run(config, stop_at_step=first_stop)
    failure = Failure(out, on_call)
    with monkeypatch.context() as patch:
        install(patch, failure)
        with pytest.raises(UserError, match=message) as error:
            run(config, resume=bool(first_stop))
    assert "Free some disk space or set output.dir to another disk" in str(error.value)
    assert failure.before is not None and kept_files(out) == failure.before
    assert [p.relative_to(out) for p in out.rglob(".*")] == []  # no staging, no .tmp
    status = read_status(out)
    assert status["state"] == "failed" and status["error"] == str(error.value)

    run(config, resume=True)
    reference, losses = uninterrupted
    resumed = load_file(out / "test.safetensors")
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[key], reference[key]) for key in reference)
    assert [m["loss"] for m in metrics(out)] == losses


def limit_file_size(limit: int):
    def apply() -> None:
        # Past the limit write(2) fails with EFBIG, as on a full disk, once
        # SIGXFSZ (which would kill the process) is ignored.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    return apply


def test_a_real_write_failure_ends_the_cli_in_one_paragraph(
    demo_model_dir, four_images, tmp_path  # noqa: F811
):
    # Files over 1 MB cannot be written: the state's optimizer file (1.6 MB
    # for this adapter) fails inside torch.save with its own error type.
    out = tmp_path / "run"
    args = overrides(demo_model_dir, four_images, out,
                     **{"train.steps": 4, "train.save_state_every_n_steps": 2})  # fmt: skip
    preset = REPO / "presets" / "sd15-character-lora.toml"
    result = subprocess.run(
        [sys.executable, "-m", "trainer", "train", str(preset), *args],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        preexec_fn=limit_file_size(1_000_000),
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: Saving the training state to {out}/state/state-00000002 "
                           "failed (RuntimeError: ")  # fmt: skip
    assert "--resume" in last and "Traceback" not in result.stderr
    assert not (out / "state").exists() or list((out / "state").iterdir()) == []
    assert [p.relative_to(out) for p in out.rglob(".*")] == []
    assert read_status(out)["state"] == "failed" and not (out / LOCK_NAME).exists()
