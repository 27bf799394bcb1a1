"""Where the GUI keeps what the user makes through it: uploaded datasets,
saved presets, training runs, job logs and previews.

Unlike the cache (`core.paths.cache_root`), nothing here can be
regenerated, so it lives in the user's data folder, not in the cache.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_UNSAFE = re.compile(r"[^\w.+-]+")


def default_data_dir() -> Path:
    """$LORA_TRAINER_DATA, else $XDG_DATA_HOME/lora-trainer, else ~/.local/share/lora-trainer."""
    if override := os.environ.get("LORA_TRAINER_DATA"):
        return Path(override)
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "lora-trainer"


@dataclass(frozen=True)
class DataDirs:
    root: Path

    @property
    def datasets(self) -> Path:
        return self.root / "datasets"

    @property
    def presets(self) -> Path:
        return self.root / "presets"

    @property
    def outputs(self) -> Path:
        return self.root / "outputs"

    @property
    def jobs(self) -> Path:
        return self.root / "jobs"

    @property
    def previews(self) -> Path:
        return self.root / "previews"

    @property
    def thumbs(self) -> Path:
        return self.root / "thumbs"

    @property
    def base_config(self) -> Path:
        """An empty TOML: the schema defaults, the base of runs without a preset."""
        return self.root / "defaults.toml"

    def create(self) -> DataDirs:
        for folder in (self.datasets, self.presets, self.outputs, self.jobs, self.previews,
                       self.thumbs):
            folder.mkdir(parents=True, exist_ok=True)
        if not self.base_config.exists():
            self.base_config.write_text("# Schema defaults: trainer/config_schema.py\n")
        return self


def safe_name(text: str, fallback: str) -> str:
    """A file or folder name made from user text: no slashes, no dot files."""
    name = _UNSAFE.sub("-", text.strip()).strip("-.")
    return name or fallback
