"""Regularization images (`dataset.reg_path`): which of them an epoch uses, how often.

kohya sd-scripts' rule (`library/train_util.py`, `DreamBoothDataset.__init__`),
followed exactly: let T be the training samples per epoch (images times their
repeats). The reg images are taken in order, each with its folder's repeats
(`N_class`), until they add up to at least T; the images after that one are
not used at all. If all of them together fall short of T, the loop goes round
again, adding one repeat to each image in order, until the count reaches T.
So an epoch holds T training samples and R >= T reg samples (R exceeds T by at
most the last used image's repeats minus one), all shuffled together into the
batches: an epoch is about twice as long in samples.

The set is the same every epoch (kohya registers the images once), so the
sampler, which orders the combined pool as a pure function of (seed, epoch),
keeps a resume exact. Where this differs from kohya: "in order" here is the
check's order (folders and files sorted by name), where kohya takes folders
in `Path.iterdir()` order, which the file system decides; sorting makes the
choice the same on every machine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RegPlan:
    """The reg images an epoch uses: `used[k]` (an index into the reg images
    given) appears `repeats[k]` times in every epoch."""

    train_samples: int
    used: tuple[int, ...]
    repeats: tuple[int, ...]
    available: int  # usable reg images given, used or not

    @property
    def reg_samples(self) -> int:
        return sum(self.repeats)

    @property
    def unused(self) -> int:
        return self.available - len(self.used)


def plan_reg(train_samples: int, reg_repeats: Sequence[int]) -> RegPlan:
    """kohya's balancing loop over the reg images' folder repeats (see the module text)."""
    if not reg_repeats or train_samples <= 0:
        return RegPlan(train_samples, (), (), len(reg_repeats))
    if any(r < 1 for r in reg_repeats):
        raise ValueError("reg images need at least one repeat each")
    counts: list[int] = []
    total = 0
    for repeats in reg_repeats:  # first pass: whole images with their folder's repeats
        counts.append(repeats)
        total += repeats
        if total >= train_samples:
            break
    # Later passes: one more repeat per image, in order, until T is reached. A
    # whole pass adds len(counts); the remainder goes to the first images.
    if total < train_samples:
        rounds, extra = divmod(train_samples - total, len(counts))
        counts = [c + rounds + (k < extra) for k, c in enumerate(counts)]
    return RegPlan(train_samples, tuple(range(len(counts))), tuple(counts), len(reg_repeats))


def describe(plan: RegPlan) -> str:
    """One line for the run's log and the Dataset tab."""
    if not plan.used:
        return "no regularization images"
    unused = (f"; {plan.unused} reg image{'s' if plan.unused != 1 else ''} not used (kohya "
              "uses the first ones that make up the training count)") if plan.unused else ""
    return (f"regularization: {plan.reg_samples} reg samples per epoch from "
            f"{len(plan.used)} image{'s' if len(plan.used) != 1 else ''}, with "
            f"{plan.train_samples} training samples{unused}")
