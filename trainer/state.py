"""The full training state, saved so that a killed run loses nothing.

A state is a folder `state-<step>` holding the adapter weights, optimizer
and scheduler state, RNG states and the data position. It is written as a
temporary folder and renamed into place, so any folder with the final name
is complete: `kill -9` at any moment leaves the previous state usable.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from trainer.errors import UserError

STATE_PREFIX = "state-"


@dataclass
class Progress:
    step: int  # optimizer steps done
    epoch: int  # data position: the next batch to train on
    batch: int
    losses_since_start: int = 0


def rng_states() -> dict:
    return {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_state(
    state_root: Path,
    progress: Progress,
    adapter: dict[str, torch.Tensor],
    optimizer,
    scheduler,
    keep: int = 2,
) -> Path:
    """Write `state_root/state-<step>` atomically, then prune all but `keep`."""
    state_root.mkdir(parents=True, exist_ok=True)
    final = state_root / f"{STATE_PREFIX}{progress.step:08d}"
    staging = Path(tempfile.mkdtemp(dir=state_root, prefix=f".{final.name}."))
    try:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in adapter.items()},
            str(staging / "adapter.safetensors"),
        )
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng_states(),
            },
            staging / "training.pt",
        )
        (staging / "progress.json").write_text(json.dumps(asdict(progress)))
        for file in staging.iterdir():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        if final.exists():  # a state of the same step from a run that was resumed
            shutil.rmtree(final)
        os.replace(staging, final)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(
            f"Saving the training state to {final} failed ({exc.strerror}); the previous state "
            "is untouched. Free some disk space."
        ) from exc
    for old in complete_states(state_root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_states(state_root: Path) -> list[Path]:
    """Complete states, oldest first (temporary folders start with a dot)."""
    if not state_root.is_dir():
        return []
    return sorted(p for p in state_root.iterdir() if p.is_dir() and p.name.startswith(STATE_PREFIX))


@dataclass
class LoadedState:
    progress: Progress
    adapter: dict[str, torch.Tensor]
    training: dict
    path: Path


def load_latest_state(state_root: Path) -> LoadedState | None:
    states = complete_states(state_root)
    if not states:
        return None
    path = states[-1]
    progress = Progress(**json.loads((path / "progress.json").read_text()))
    # Our own file; it holds optimizer tensors and Python RNG tuples.
    training = torch.load(path / "training.pt", weights_only=False)
    return LoadedState(progress, load_file(str(path / "adapter.safetensors")), training, path)
