"""Step losses kept on the device and read back in batches.

Reading a CUDA loss with float() waits for the GPU to finish the step, so the
CPU cannot queue the next one meanwhile: one read per step costs the overlap
of every step. Each step's loss stays a device tensor here; the loop reads
them all at once (one transfer) every `every` steps, at least once a second
(the GUI's loss chart and the progress bar stay live on slow steps), and
before anything is written (a periodic file, a state, previews, the final
file), so a file is never written after a step whose loss was not checked.

A non-finite loss stops the run when it is read, naming the first step whose
loss was not finite; the files on disk all come from before it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from core.errors import UserError

# Steps between reads on a fast device; 10 steps of a 512 px SD1.5 LoRA on a
# big GPU are about half a second.
READ_EVERY_N_STEPS = 10
READ_EVERY_S = 1.0


@dataclass
class StepRecord:
    step: int  # 1-based, as the user counts steps
    loss: float
    lr: float
    epoch: int
    # The host's time from the previous step's end to this one's. On a GPU the
    # host waits on the launch queue, which is shorter than a step, so this
    # tracks the device's step time without a sync.
    seconds: float


@dataclass
class LossReadout:
    every: int = READ_EVERY_N_STEPS
    every_s: float = READ_EVERY_S
    reads: int = 0  # how many device read-backs so far (tests count them)
    _losses: list[torch.Tensor] = field(default_factory=list)
    _pending: list[tuple[int, float, int, float]] = field(default_factory=list)
    _read_at: float = field(default_factory=time.perf_counter)
    _step_ended_at: float = field(default_factory=time.perf_counter)

    def add(self, step: int, loss: torch.Tensor, lr: float, epoch: int) -> None:
        """The loss of finished step `step` (a 0-dim tensor, not read yet)."""
        now = time.perf_counter()
        self._losses.append(loss.detach().reshape(()).float())
        self._pending.append((step, lr, epoch, now - self._step_ended_at))
        self._step_ended_at = now

    def due(self) -> bool:
        return len(self._pending) >= self.every or (
            bool(self._pending) and time.perf_counter() - self._read_at >= self.every_s
        )

    def read(self) -> list[StepRecord]:
        """The pending steps' records (one device read), oldest first."""
        if not self._pending:
            return []
        values = torch.stack(self._losses).cpu().tolist()
        self.reads += 1
        records = [StepRecord(step, loss, lr, epoch, seconds) for (step, lr, epoch, seconds), loss
                   in zip(self._pending, values, strict=True)]
        self._losses, self._pending, self._read_at = [], [], time.perf_counter()
        return records


def checked(records: list[StepRecord]) -> tuple[list[StepRecord], StepRecord | None]:
    """The records before the first non-finite loss, and that step's record
    (None when all are finite): steps past it are not logged."""
    for index, record in enumerate(records):
        if not math.isfinite(record.loss):
            return records[:index], record
    return records, None


def diverged(bad: StepRecord, folder) -> UserError:
    return UserError(
        f"The loss became {bad.loss} at step {bad.step}: training diverged. The files saved "
        f"so far in {folder} are kept. Lower train.unet_lr / "
        'train.text_encoder_lr, or use mixed_precision = "bf16" instead of "fp16".'
    )
