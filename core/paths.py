"""Where the project keeps generated files that are not the user's outputs."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$LORA_TRAINER_CACHE, else $XDG_CACHE_HOME/lora-trainer, else ~/.cache/lora-trainer."""
    if override := os.environ.get("LORA_TRAINER_CACHE"):
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lora-trainer"
