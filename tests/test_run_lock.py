"""One trainer per run folder: the lock refuses a second holder by name and
takes over locks whose owner is gone; status.json is replaced whole."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.errors import UserError
from core.run_lock import (
    LOCK_NAME,
    Owner,
    RunLock,
    live_owner,
    process_start_time,
    read_owner,
    read_status,
    write_status,
)

REPO = Path(__file__).resolve().parents[1]
HOLD = (
    "import sys, time\n"
    "from core.run_lock import RunLock\n"
    "RunLock(sys.argv[1]).acquire()\n"
    "print('held', flush=True)\n"
    "time.sleep(120)\n"
)


def holder(folder: Path) -> subprocess.Popen:
    """Another process holding `folder`, as a running trainer does."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)], cwd=REPO, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert process.stdout.readline().strip() == "held"
    return process


def sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def write_lock(folder: Path, pid: int, start_time: str, host: str | None = None) -> None:
    owner = {"pid": pid, "start_time": start_time, "host": host or socket.gethostname(),
             "started_at": time.time() - 60}  # fmt: skip
    (folder / LOCK_NAME).write_text(json.dumps(owner))


def test_a_held_folder_is_refused_naming_its_trainer_and_free_once_it_is_killed(tmp_path):
    process = holder(tmp_path)
    try:
        with pytest.raises(UserError, match=rf"Another trainer \(process {process.pid} on "):
            RunLock(tmp_path).acquire()
        assert live_owner(tmp_path).pid == process.pid
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    # kill -9 left its lock file behind; the kernel dropped the hold.
    assert read_owner(tmp_path).pid == process.pid and live_owner(tmp_path) is None
    with RunLock(tmp_path) as lock:
        assert read_owner(tmp_path) == lock.owner and lock.owner.pid == os.getpid()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_second_lock_in_the_same_process_is_refused(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(UserError, match=rf"process {os.getpid()} .*kill -TERM {os.getpid()}"):
            RunLock(tmp_path).acquire()
    RunLock(tmp_path).acquire().release()


def test_a_lock_of_a_dead_process_is_taken_over(tmp_path):
    gone = sleeper()
    start = process_start_time(gone.pid)
    gone.kill()
    gone.wait()
    write_lock(tmp_path, gone.pid, start)
    with RunLock(tmp_path) as lock:
        assert read_owner(tmp_path) == lock.owner


def test_a_lock_whose_pid_now_belongs_to_another_process_is_taken_over(tmp_path):
    other = sleeper()
    try:
        # The pid is alive, but it was started after the lock's owner: reused.
        real_start = process_start_time(other.pid)
        write_lock(tmp_path, other.pid, str(int(real_start) - 1))
        assert live_owner(tmp_path) is None
        with RunLock(tmp_path) as lock:
            assert read_owner(tmp_path).pid == lock.owner.pid == os.getpid()
    finally:
        other.kill()
        other.wait()


def test_a_live_owner_named_in_the_file_is_respected_even_without_its_hold(tmp_path):
    # What a lock from before the flock, or from a filesystem without locks, looks like.
    other = sleeper()
    try:
        write_lock(tmp_path, other.pid, process_start_time(other.pid))
        with pytest.raises(UserError, match=f"process {other.pid}"):
            RunLock(tmp_path).acquire()
        assert read_owner(tmp_path).pid == other.pid  # left as it was
    finally:
        other.kill()
        other.wait()


def test_a_lock_from_another_host_is_refused_with_how_to_clear_it(tmp_path):
    write_lock(tmp_path, 1, "5", host="elsewhere")
    with pytest.raises(UserError, match=f"no trainer runs on elsewhere any more, delete "
                                        f".*{LOCK_NAME}"):  # fmt: skip
        RunLock(tmp_path).acquire()


def test_a_folder_that_cannot_hold_a_lock_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match=f"Cannot create the lock file {blocker}/.*output.dir"):
        RunLock(blocker).acquire()


def test_status_is_replaced_whole_and_names_its_writer(tmp_path):
    assert read_status(tmp_path) is None
    write_status(tmp_path, "training", 3, 10)
    write_status(tmp_path, "failed", 4, 10, error="disk full", files={"state": "s"})
    status = read_status(tmp_path)
    assert (status["state"], status["step"], status["total"]) == ("failed", 4, 10)
    assert status["error"] == "disk full" and status["files"] == {"state": "s"}
    me = Owner(os.getpid(), process_start_time(os.getpid()), socket.gethostname(), 0)
    assert (status["pid"], status["pid_start"], status["host"]) == (me.pid, me.start_time, me.host)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]


def test_only_final_statuses_are_fsynced_and_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    write_status(tmp_path, "training", 3, 10)
    assert synced == [] and read_status(tmp_path)["state"] == "training"
    assert (tmp_path / "status.json").stat().st_mode & 0o777 == 0o644
    write_status(tmp_path, "done", 10, 10)
    assert len(synced) == 1 and read_status(tmp_path)["state"] == "done"

    def refuse(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError):
        write_status(tmp_path, "training", 4, 10)
    assert read_status(tmp_path)["state"] == "done"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]
