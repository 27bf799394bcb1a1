"""Write-then-rename, the one way this project writes a file a user keeps.

A crash, a full disk or a concurrent reader then sees the old file or the new
one, never half of one. Imports nothing heavy: the GUI uses it too.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from .errors import UserError


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file to write `path`'s new content into; on success it is
    fsynced and renamed over `path`, on any failure it is removed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise UserError(
            f"Cannot write {path}: {exc.strerror}. Choose a folder you can write to."
        ) from exc
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; outputs are not secret and may be shared.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise UserError(
            f"Writing {path} failed ({exc.strerror}); the previous file, if any, is untouched. "
            "Free some disk space or choose another output folder."
        ) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, payload: bytes) -> None:
    with atomic_writer(path) as f:
        f.write(payload)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
