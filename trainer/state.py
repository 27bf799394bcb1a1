"""The full training state, saved so that a killed run loses nothing.

A state is a folder `state/state-<step>` (names: core/run_layout.py)
holding the adapter weights, optimizer and scheduler state, RNG states and
the data position. It is written as a temporary folder and renamed into
place, so any folder with the final name is complete: `kill -9` at any
moment leaves the previous state usable.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from core.atomic import failure_reason
from core.errors import UserError
from core.run_layout import complete_states, is_state_staging_name, state_dir_name

SAVE_ADVICE = ("Free some disk space or set output.dir to another disk, then continue with "
               "--resume.")


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
    final = state_root / state_dir_name(progress.step)
    tensors = {k: v.detach().cpu().contiguous() for k, v in adapter.items()}
    training = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": rng_states()}
    staging = None
    try:
        state_root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=state_root, prefix=f".{final.name}."))
        save_file(tensors, str(staging / "adapter.safetensors"))
        torch.save(training, staging / "training.pt")
        (staging / "progress.json").write_text(json.dumps(asdict(progress)))
        for file in staging.iterdir():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        if final.exists():  # a state of the same step from a run that was resumed
            _discard(final)
        os.replace(staging, final)
    # The serialisers report a full disk in their own types: safetensors as
    # SafetensorError, torch.save as RuntimeError ("PytorchStreamWriter failed
    # writing file", "enforce fail at inline_container.cc").
    except (OSError, RuntimeError, SafetensorError) as exc:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise UserError(
            f"Saving the training state to {final} failed ({failure_reason(exc, state_root)}); "
            f"the previous state is untouched. {SAVE_ADVICE}"
        ) from exc
    for old in complete_states(state_root)[:-keep]:
        _discard(old)
    return final


def _discard(state: Path) -> None:
    """Delete a state folder; renamed out of the complete ones first, so that
    a kill during the deletion cannot leave half a state under a final name."""
    hidden = state.with_name(f".{state.name}.{os.getpid()}-{time.monotonic_ns()}.old")
    try:
        os.replace(state, hidden)
    except OSError:
        return
    shutil.rmtree(hidden, ignore_errors=True)


def remove_staging_leftovers(state_root: Path) -> list[Path]:
    """Delete the temporary folders of saves that failed or were killed. Only
    call it while holding the run folder: another trainer's save in progress
    looks just the same."""
    if not state_root.is_dir():
        return []
    leftovers = [p for p in state_root.iterdir()
                 if is_state_staging_name(p.name) and p.is_dir()]
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return leftovers


def latest_progress(state_root: Path) -> tuple[Path, Progress] | None:
    """The newest complete state and how far it got, without loading its tensors."""
    states = complete_states(state_root)
    if not states:
        return None
    return states[-1], _read_progress(states[-1])


def _read_progress(path: Path) -> Progress:
    return Progress(**json.loads((path / "progress.json").read_text()))


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
    progress = _read_progress(path)
    # Our own file; it holds optimizer tensors and Python RNG tuples.
    training = torch.load(path / "training.pt", weights_only=False)
    return LoadedState(progress, load_file(str(path / "adapter.safetensors")), training, path)
