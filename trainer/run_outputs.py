"""Everything a run writes for the user: adapter files, metrics, TensorBoard
logs, previews and the resolved config, named as core/run_layout.py says
(the GUI reads them by the same names). Used on the main process only.

A write that fails (a full disk, permissions) is a UserError naming the file;
what was written before stays as it was, so the run continues with --resume.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# Imported with the rest of the start-up, where Ctrl-C still stops quietly.
from torch.utils.tensorboard import SummaryWriter

from core.atomic import atomic_write_text, atomic_writer, remove_tmp_leftovers
from core.errors import UserError
from core.run_layout import RunLayout
from trainer.state import SAVE_ADVICE, remove_staging_leftovers


def check_writable(folder: Path) -> None:
    """Fail before any model is loaded, not after an hour of training."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # Nameless where the system allows: a kill leaves nothing behind, and
        # no other trainer's clean-up can delete it under our feet.
        with tempfile.TemporaryFile(dir=folder) as probe:
            probe.write(b"ok")
            probe.flush()
    except OSError as exc:
        raise UserError(
            f"The output folder {folder} is not writable ({exc.strerror}); set output.dir to a "
            "folder you can write to."
        ) from exc


@dataclass
class RunOutputs:
    folder: Path
    name: str
    keep_last_n: int = 0
    final_written: bool = False  # by this run
    _tensorboard: object = None
    _periodic: list[Path] = field(default_factory=list)

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.folder, self.name)

    @property
    def final_file(self) -> Path:
        return self.layout.final_file

    def periodic_file(self, step: int) -> Path:
        return self.layout.periodic_file(step)

    @property
    def state_root(self) -> Path:
        return self.layout.state_root

    @property
    def samples(self) -> Path:
        return self.layout.samples

    def remove_leftovers(self) -> None:
        """Temporary files and staging folders of saves that failed or were
        killed. Only while holding the folder's lock: another trainer's save in
        progress looks just the same."""
        remove_tmp_leftovers(self.folder)
        remove_tmp_leftovers(self.samples)
        remove_staging_leftovers(self.state_root)

    def files(self) -> dict[str, str]:
        """What a user picks up from the folder: the final adapter (if this run
        wrote it), the newest state and the newest periodic adapter."""
        found = {}
        if self.final_written:
            found["final"] = str(self.final_file)
        if states := self.layout.complete_states():
            found["state"] = str(states[-1])
        if periodic := self.layout.periodic_files():
            found["periodic"] = str(periodic[-1])
        return found

    def write_config(self, toml_text: str) -> None:
        atomic_write_text(self.layout.config, toml_text, SAVE_ADVICE)

    def start_metrics(self, resumed_step: int) -> None:
        """Keep the metrics of steps already done (a resumed run continues the file)."""
        path = self.layout.metrics
        kept = []
        if resumed_step and path.exists():
            for line in path.read_text().splitlines():
                record = _parsed(line)
                if record is not None and record.get("step", 0) <= resumed_step:
                    kept.append(line)
        atomic_write_text(path, "".join(f"{line}\n" for line in kept), SAVE_ADVICE)
        if not resumed_step:  # a new run's best is its own (trainer/validation.py)
            self.layout.validation.unlink(missing_ok=True)
        tensorboard = self.layout.tensorboard
        try:
            self._tensorboard = SummaryWriter(str(tensorboard), purge_step=resumed_step + 1)
        except OSError as exc:
            raise self._write_error(tensorboard, exc) from exc

    def log(self, step: int, **values: float) -> None:
        record = {"step": step, **values, "time": round(time.time(), 3)}
        path = self.layout.metrics
        try:
            _append(path, (json.dumps(record) + "\n").encode("utf-8"))
        except OSError as exc:
            raise self._write_error(path, exc) from exc
        try:
            for key, value in values.items():
                # val_loss -> val/loss, next to train/loss
                tag = f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"
                self._tensorboard.add_scalar(tag, value, step)
        except OSError as exc:  # its writer thread's failure, reported on the next write
            raise self._write_error(self.layout.tensorboard, exc) from exc

    def remember_periodic(self, path: Path) -> None:
        """Delete the oldest periodic files beyond `keep_last_n` (0 keeps all)."""
        self._periodic.append(path)
        if self.keep_last_n:
            while len(self._periodic) > self.keep_last_n:
                self._periodic.pop(0).unlink(missing_ok=True)

    def save_previews(self, step: int, images: list) -> list[Path]:
        paths = []
        for index, image in enumerate(images):
            path = self.layout.preview(step, index)
            with atomic_writer(path, SAVE_ADVICE) as file:
                image.save(file, format="PNG")
            paths.append(path)
        return paths

    def save_compare_grid(self, image) -> Path:
        """`sample.compare`'s grid, rewritten whole at each sampling point."""
        path = self.layout.compare_grid
        with atomic_writer(path, SAVE_ADVICE) as file:
            image.save(file, format="PNG")
        return path

    def close(self) -> None:
        if self._tensorboard is not None:
            tensorboard, self._tensorboard = self._tensorboard, None
            try:
                tensorboard.close()
            except OSError as exc:
                raise self._write_error(self.layout.tensorboard, exc) from exc

    @staticmethod
    def _write_error(path: Path, exc: OSError) -> UserError:
        return UserError(
            f"Writing {path} failed ({exc.strerror or exc}); what was written before is kept. "
            f"{SAVE_ADVICE}"
        )


def _append(path: Path, data: bytes) -> None:
    """Append whole lines only: a torn last line (a full disk) would make the
    file unreadable for the next resume, so a failed append is cut off again."""
    with open(path, "ab", buffering=0) as file:
        size = os.fstat(file.fileno()).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[file.write(view):]
        except OSError:
            file.truncate(size)
            raise


def _parsed(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None  # torn by a kill in the middle of a write
    return record if isinstance(record, dict) else None
