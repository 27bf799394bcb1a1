"""Where everything of one training run lives in its output folder.

The trainer writes the folder and the GUI reads it while the trainer runs
and after it has gone, so both take every name from here; a name derived
twice drifts (a renamed preview the GUI no longer shows, a state folder the
Resume picker no longer counts). Torch-free and reading no file contents:
the GUI imports this.

    <folder>/
      <name>.safetensors                the final adapter
      <name>-step000200.safetensors     periodic adapters
      state/state-00000200/             complete training states (renamed into place)
      state/.state-00000200.XXXX/       a save in progress, or one that was killed
      samples/step000200-0.png          previews: step, then prompt index
      samples/compare.png               with/without-adapter grid (sample.compare)
      metrics.jsonl  config.toml  tensorboard/
      trainer.lock  status.json         who trains here, and how far it got (core/run_lock.py)
"""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass
from pathlib import Path

from core.run_lock import LOCK_NAME, STATUS_NAME

ADAPTER_SUFFIX = ".safetensors"
STATE_DIR = "state"
STATE_PREFIX = "state-"
SAMPLES_DIR = "samples"
METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.toml"
TENSORBOARD_DIR = "tensorboard"
VALIDATION_NAME = "validation.json"  # the best validation loss, its step and file
COMPARE_GRID_NAME = "compare.png"  # trainer/compare_grid.py

# Zero-padded, so that names sort as steps do (the newest is the last).
_STATE = re.compile(r"state-(\d+)")
_PREVIEW = re.compile(r"step(\d+)-(\d+)\.png")


def state_dir_name(step: int) -> str:
    return f"{STATE_PREFIX}{step:08d}"


def state_step(name: str) -> int | None:
    """The step of a complete state folder's name; None for anything else (a
    staging folder starts with a dot)."""
    match = _STATE.fullmatch(name)
    return int(match.group(1)) if match else None


def complete_states(state_root: Path) -> list[Path]:
    """The complete state folders in `state_root`, oldest first."""
    if not state_root.is_dir():
        return []
    found = [p for p in state_root.iterdir() if state_step(p.name) is not None and p.is_dir()]
    return sorted(found, key=lambda p: state_step(p.name))


def is_state_staging_name(name: str) -> bool:
    """A state being written or deleted (`.state-<step>.<random>`), which a
    kill may leave behind."""
    return name.startswith(f".{STATE_PREFIX}")


def preview_name(step: int, index: int) -> str:
    return f"step{step:06d}-{index}.png"


def preview_position(name: str) -> tuple[int, int] | None:
    """(step, prompt index) of a preview's name; None for any other name."""
    match = _PREVIEW.fullmatch(name)
    return (int(match.group(1)), int(match.group(2))) if match else None


def is_preview_name(name: str) -> bool:
    return preview_position(name) is not None


def in_state_folder(path: Path, root: Path) -> bool:
    """Whether `path` (under `root`) is inside some run's state folder: the
    adapter weights saved with a training state are no export."""
    return STATE_DIR in path.relative_to(root).parts[:-1]


def adapters_under(root: Path) -> list[Path]:
    """Every adapter file under `root` (a run folder or a folder of runs),
    training states left out."""
    if not root.is_dir():
        return []
    return [p for p in root.rglob(f"*{ADAPTER_SUFFIX}") if not in_state_folder(p, root)]


@dataclass(frozen=True)
class RunLayout:
    folder: Path
    name: str = ""  # output.name; only the adapter files' names need it

    def __post_init__(self):
        object.__setattr__(self, "folder", Path(self.folder))

    # --- adapters ------------------------------------------------------------
    @property
    def final_file(self) -> Path:
        return self.folder / f"{self.name}{ADAPTER_SUFFIX}"

    def periodic_file(self, step: int) -> Path:
        return self.folder / f"{self.name}-step{step:06d}{ADAPTER_SUFFIX}"

    def periodic_files(self) -> list[Path]:
        """Periodic adapters, oldest first."""
        return sorted(self.folder.glob(f"{glob.escape(self.name)}-step[0-9]*{ADAPTER_SUFFIX}"))

    # --- training states ---------------------------------------------------
    @property
    def state_root(self) -> Path:
        return self.folder / STATE_DIR

    def state_dir(self, step: int) -> Path:
        return self.state_root / state_dir_name(step)

    def complete_states(self) -> list[Path]:
        return complete_states(self.state_root)

    def saved_step(self) -> int | None:
        """The step of the newest complete state, or None."""
        states = self.complete_states()
        return state_step(states[-1].name) if states else None

    def holds_run(self) -> bool:
        """An adapter or anything in state/: starting afresh would overwrite work."""
        state = self.state_root
        return (any(self.folder.glob(f"*{ADAPTER_SUFFIX}"))
                or (state.is_dir() and any(state.iterdir())))

    # --- what the trainer logs ---------------------------------------------
    @property
    def samples(self) -> Path:
        return self.folder / SAMPLES_DIR

    def preview(self, step: int, index: int) -> Path:
        return self.samples / preview_name(step, index)

    def newest_samples(self, limit: int = 8) -> list[Path]:
        """Preview images, newest step first."""
        if not self.samples.is_dir():
            return []
        found = [p for p in self.samples.iterdir() if is_preview_name(p.name)]
        return sorted(found, key=lambda p: preview_position(p.name), reverse=True)[:limit]

    @property
    def compare_grid(self) -> Path:
        return self.samples / COMPARE_GRID_NAME

    def shown_samples(self, limit: int = 8) -> list[Path]:
        """What the GUI shows: the compare grid first (it holds every
        sampling point so far), then the newest previews."""
        grid = [self.compare_grid] if self.compare_grid.is_file() else []
        return grid + self.newest_samples(limit)

    @property
    def metrics(self) -> Path:
        return self.folder / METRICS_NAME

    @property
    def config(self) -> Path:
        return self.folder / CONFIG_NAME

    @property
    def tensorboard(self) -> Path:
        return self.folder / TENSORBOARD_DIR

    @property
    def validation(self) -> Path:
        return self.folder / VALIDATION_NAME

    # --- who trains here -----------------------------------------------------
    @property
    def lock(self) -> Path:
        return self.folder / LOCK_NAME

    @property
    def status(self) -> Path:
        return self.folder / STATUS_NAME


def is_preview(path: Path) -> bool:
    """Named as a run's preview image or its compare grid, in a samples folder
    (the content is the caller's to check)."""
    return path.parent.name == SAMPLES_DIR and (
        is_preview_name(path.name) or path.name == COMPARE_GRID_NAME)
