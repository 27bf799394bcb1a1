"""Write-then-rename, the one way this project writes a file a user keeps.

A crash, a full disk or a concurrent reader then sees the old file or the new
one, never half of one. Imports nothing heavy: the GUI uses it too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from .errors import UserError

DEFAULT_ADVICE = "Free some disk space or choose another folder you can write to."
TMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, advice: str = DEFAULT_ADVICE) -> Iterator[BinaryIO]:
    """A binary file to write `path`'s new content into; on success it is
    fsynced and renamed over `path`, on any failure it is removed. A failed
    write is a UserError naming `path` and ending in `advice`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    except OSError as exc:
        raise UserError(f"Cannot write {path}: {exc.strerror}. {advice}") from exc
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
            f"Writing {path} failed ({failure_reason(exc, path.parent)}); the previous file, if "
            f"any, is untouched. {advice}"
        ) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, payload: bytes,
                       advice: str = DEFAULT_ADVICE) -> None:
    with atomic_writer(path, advice) as f:
        f.write(payload)


def atomic_write_text(path: str | os.PathLike, text: str, advice: str = DEFAULT_ADVICE) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), advice)


def failure_reason(exc: BaseException, folder: Path) -> str:
    """Why a write failed, in a few words. The serialisers' own errors
    (safetensors', torch.save's) do not say "disk full" in words a user
    reads, so the free space is added when it is low."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    lines = str(exc).strip().splitlines()
    reason = f"{type(exc).__name__}: {lines[0] if lines else 'no details'}"
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return reason
    return reason if free > 64 * 2**20 else f"{reason}; {free / 2**20:.1f} MiB free on that disk"


def remove_tmp_leftovers(folder: Path) -> list[Path]:
    """Delete the temporary files of writes that were killed in `folder`.
    Only call it while holding the folder: another writer's live temporary
    file looks just the same."""
    removed = []
    try:
        candidates = list(Path(folder).iterdir())
    except OSError:
        return removed
    for path in candidates:
        if path.name.startswith(".") and path.name.endswith(TMP_SUFFIX) and path.is_file():
            with contextlib.suppress(OSError):  # garbage: one that stays is no failure
                path.unlink()
                removed.append(path)
    return removed
