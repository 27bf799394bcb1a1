"""Who trains in a run folder, and how far it got: the lock and the status file.

One trainer per run folder: two trainers writing the same state, metrics and
adapter files interleave them (a second GUI, or Resume after the GUI lost
sight of a trainer that still runs). The trainer takes `trainer.lock` before it
touches anything in the folder and keeps `status.json` up to date; the GUI
reads both, so a restarted GUI finds trainers that are still alive.

A lock names its owner by pid *and* process start time: after a crash or a
reboot the pid may belong to another process, and a lock whose owner is gone
is stale and taken over. Whether a trainer may take the folder is settled by
an flock on the file, which the kernel drops with its process; readers (the
GUI) go by the recorded pid and start time. Torch-free: the GUI imports this.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from core.atomic import TMP_SUFFIX, atomic_write_text
from core.errors import UserError

LOCK_NAME = "trainer.lock"
STATUS_NAME = "status.json"

# status.json "state" values; a trainer killed with SIGKILL leaves its last
# one behind, which is why readers also ask whether the owner is alive.
STARTING, TRAINING, STOPPED, DONE, FAILED = "starting", "training", "stopped", "done", "failed"
FINAL_STATES = (STOPPED, DONE, FAILED)


@dataclass(frozen=True)
class Owner:
    pid: int
    start_time: str  # /proc/<pid>/stat start time in clock ticks; "" where unknown
    host: str
    started_at: float  # wall clock, for people

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started_at))
        return f"process {self.pid} on {self.host}, started {since}"


def process_start_time(pid: int) -> str:
    """The kernel's start time of `pid` ('' if unknown or gone): with the pid
    it names one process for good, as pids are reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    # The command name (field 2) may hold spaces and parentheses: split after it.
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[19] if len(fields) > 19 else ""


def this_process() -> Owner:
    pid = os.getpid()
    return Owner(pid, process_start_time(pid), socket.gethostname(), time.time())


def is_alive(owner: Owner) -> bool:
    """Whether the owner still runs. A lock from another host is taken as alive:
    a shared folder's trainer elsewhere cannot be checked from here."""
    if owner.host != socket.gethostname():
        return True
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    if owner.start_time and process_start_time(owner.pid) != owner.start_time:
        return False  # the pid was reused
    return _not_zombie(owner.pid)


def _not_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: kill(0) said it exists
    return stat[stat.rfind(")") + 2:][:1] != "Z"


def read_owner(folder: Path) -> Owner | None:
    """The lock's owner, or None without a (readable) lock."""
    try:
        data = json.loads((Path(folder) / LOCK_NAME).read_text())
        return Owner(int(data["pid"]), str(data["start_time"]), str(data["host"]),
                     float(data["started_at"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def live_owner(folder: Path) -> Owner | None:
    """The trainer that holds `folder` now, or None."""
    owner = read_owner(folder)
    return owner if owner is not None and is_alive(owner) else None


class RunLock:
    """`with RunLock(folder):` holds the folder for this process, or refuses.

    The file carries the owner for readers (the GUI); the hold itself is an
    flock on it, which the kernel drops when the process dies however it
    dies. So of two trainers taking over one stale lock at the same moment,
    exactly one wins, and a lock whose owner is gone is free without anyone
    having to judge it stale first.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.owner: Owner | None = None
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        for _ in range(3):
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self._refuse(self._wait_for_owner())
            if not self._still_at_path(fd):  # its holder unlinked it meanwhile: retry
                os.close(fd)
                continue
            previous = read_owner(self.folder)
            if previous is not None and _held_elsewhere(previous):
                os.close(fd)
                self._refuse(previous)
            self._write_owner(fd)
            return self
        raise UserError(f"Could not take the lock {self.path}: other trainers keep starting in "
                        f"{self.folder}. Stop them, or set another output.name.")

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserError(f"Cannot create the lock file {self.path} ({exc.strerror}); set "
                            "output.dir to a folder you can write to.") from exc

    def _still_at_path(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except OSError:
            return False

    def _wait_for_owner(self) -> Owner | None:
        # The holder writes its name just after taking the flock.
        for _ in range(10):
            if (owner := read_owner(self.folder)) is not None:
                return owner
            time.sleep(0.05)
        return None

    def _write_owner(self, fd: int) -> None:
        me = this_process()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(asdict(me)).encode(), 0)
        except OSError as exc:
            self.path.unlink(missing_ok=True)  # ours: we hold its flock
            os.close(fd)
            raise UserError(f"Cannot write the lock file {self.path} ({exc.strerror}); free some "
                            "disk space or set output.dir to another folder.") from exc
        self.owner, self._fd = me, fd

    def _refuse(self, owner: Owner | None) -> None:
        who = f"({owner.describe()}) " if owner is not None else ""
        elsewhere = ""
        if owner is not None and owner.host != socket.gethostname():
            elsewhere = f" If no trainer runs on {owner.host} any more, delete {self.path}."
        pid = f"kill -TERM {owner.pid}" if owner is not None else "kill -TERM its process"
        raise UserError(
            f"Another trainer {who}is already training in {self.folder}. Wait for it to finish "
            f"or stop it (in the GUI, or {pid}); to train something else at the same time, set "
            f"another output.name.{elsewhere}"
        )

    def release(self) -> None:
        if self._fd is None:
            return
        # Unlink before closing (which drops the flock): a trainer that opened
        # the old file meanwhile sees it is gone from the path and retries.
        if self._still_at_path(self._fd):
            self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self.owner, self._fd = None, None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _held_elsewhere(owner: Owner) -> bool:
    """A recorded owner that may still run although its flock is free: one on
    another host (a shared folder whose locks do not reach here), or a live
    local process that wrote the lock without taking the flock."""
    if owner.host == socket.gethostname() and owner.pid == os.getpid():
        return False  # ours, left by an earlier run in this process
    return is_alive(owner)


def write_status(folder: Path, state: str, step: int, total: int, error: str = "",
                 files: dict[str, str] | None = None, extra: dict | None = None) -> None:
    """Replace status.json (atomically: a reader never sees half of it).
    `extra`: more fields, such as "oom_retries" (trainer/oom_retry.py).

    Only a final state is fsynced. The others are rewritten every second
    from inside the training loop, where an fsync on a disk busy with other
    jobs blocks the step (up to 50 ms measured on a shared VM, against a
    0.1 s step); losing one to a power cut loses nothing: the next run
    rewrites it and readers also check whether the owner is alive."""
    owner = this_process()
    record = {"state": state, "step": step, "total": total, "pid": owner.pid,
              "pid_start": owner.start_time, "host": owner.host, "error": error,
              "files": files or {}, "updated_at": time.time()}
    record.update({k: v for k, v in (extra or {}).items() if k not in record})
    text = json.dumps(record, indent=1) + "\n"
    path = Path(folder) / STATUS_NAME
    if state in FINAL_STATES:
        atomic_write_text(path, text)
    else:
        _replace_unsynced(path, text.encode("utf-8"))


def _replace_unsynced(path: Path, payload: bytes) -> None:
    # Named like core.atomic's temporary files, so that a killed write's
    # leftover is cleared the same way (remove_tmp_leftovers).
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(payload)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_status(folder: Path) -> dict | None:
    try:
        data = json.loads((Path(folder) / STATUS_NAME).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
