"""Bounds on a dataset scan: system folders refused, depth/entries/time limited, cancellable.

A dataset is a folder of images with a few levels of kohya "N_name"
subfolders; a path such as `/` or a home folder would otherwise be walked for
minutes with no output and no way to stop it.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from core.errors import UserError

# Folders of the operating system: scanning them is never what the user meant,
# and walking /proc or /sys does not end. Inside these nothing is a dataset.
_SYSTEM_TREES = ("/proc", "/sys", "/dev", "/etc", "/usr", "/bin", "/sbin", "/lib", "/lib32",
                 "/lib64", "/libx32", "/boot", "/System")
# These hold other people's folders (home folders, mounted drives) that may hold
# a dataset, but are never one themselves.
_SYSTEM_FOLDERS = frozenset({"/home", "/Users", "/var", "/run", "/media", "/mnt", "/private",
                             "/Library", "/Volumes", "/srv", "/opt", "/tmp", "/root"})
_WHAT_TO_DO = ("Point dataset.path at the folder that holds your images (and their caption "
               "files or kohya \"N_name\" subfolders)")


@dataclass(frozen=True)
class ScanLimits:
    """How far a scan may go before it stops and says why; far above any real
    dataset, far below a whole disk."""

    max_depth: int = 8  # subfolder levels below the dataset folder
    max_entries: int = 200_000  # files and folders looked at, hidden ones included
    max_seconds: float = 120.0

    def __post_init__(self) -> None:
        if self.max_depth < 0 or self.max_entries < 1 or not self.max_seconds > 0:
            raise UserError(
                f"Scan limits must be a depth of 0 or more, at least 1 entry and more than 0 "
                f"seconds (got depth {self.max_depth}, {self.max_entries} entries, "
                f"{self.max_seconds:g} seconds).")


class ScanStopped(UserError):
    """The scan was refused, went past a `ScanLimits` bound, or was cancelled."""


def refuse_system_folder(folder: Path) -> None:
    """ScanStopped for a filesystem root or an operating-system folder."""
    for path in {folder, Path(os.path.realpath(folder))}:
        posix = path.as_posix().rstrip("/") or "/"
        in_tree = any(posix == t or posix.startswith(f"{t}/") for t in _SYSTEM_TREES)
        windows = bool(path.drive) and path.parts[1:2] in ((), ("Windows",), ("Program Files",))
        if path.parent == path or in_tree or posix in _SYSTEM_FOLDERS or windows:
            raise ScanStopped(
                f"Refusing to scan {folder} as a dataset: it is a system folder or a whole "
                f"disk, not a folder of training images. {_WHAT_TO_DO}.")


class ScanBudget:
    """One scan's allowance of depth, entries and time, and its cancel switch."""

    def __init__(self, root: Path, limits: ScanLimits, cancel: threading.Event | None) -> None:
        self.root, self.limits, self.cancel = root, limits, cancel
        self.deadline = time.monotonic() + limits.max_seconds
        self.entries = 0

    def enter(self, rel: str) -> None:
        """Before listing the folder `rel` (POSIX, relative to the root; "" = the root)."""
        depth = rel.count("/") + 1 if rel else 0
        if depth > self.limits.max_depth:
            self._stop(f"{self.root / rel} is {depth} folder levels below it (the limit is "
                       f"{self.limits.max_depth})")

    def tick(self) -> None:
        """For every directory entry listed."""
        self.entries += 1
        if self.entries > self.limits.max_entries:
            self._stop(f"it holds more than {self.limits.max_entries:,} files and folders "
                       "(the limit)")
        self.check()

    def check(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise ScanStopped(f"Scan of {self.root} cancelled after {self.entries:,} files and "
                              "folders; nothing was changed.")
        if time.monotonic() > self.deadline:
            self._stop(f"looking through it took more than {self.limits.max_seconds:g} seconds "
                       f"(the limit; {self.entries:,} files and folders so far)")

    def _stop(self, why: str) -> None:
        raise ScanStopped(f"Stopped scanning {self.root}: {why}. {_WHAT_TO_DO}, not a folder "
                          "above it; nothing was changed.")
