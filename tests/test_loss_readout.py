"""Losses read back every N steps: the NaN stop still names the step it
happened at, keeps the files saved before it and writes none after it."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from safetensors.torch import load_file

from core.errors import UserError
from tests.test_train import config_for, four_images, metrics  # noqa: F401
from trainer import loss_readout
from trainer.train import run

BAD_STEP = 7


class CountingReadout(loss_readout.LossReadout):
    made: list[CountingReadout] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        CountingReadout.made.append(self)


@pytest.fixture
def poisoned_step(monkeypatch):
    """The training loss of step BAD_STEP is NaN (the steps around it are real),
    and losses are read by step count only (no clock), so reads are at known steps."""
    import trainer.train as train

    original, calls = train.training_loss, []

    def loss(*args, **kwargs):
        calls.append(1)
        value = original(*args, **kwargs)
        return value * float("nan") if len(calls) == BAD_STEP else value

    monkeypatch.setattr(train, "training_loss", loss)
    monkeypatch.setattr(train, "READ_EVERY_S", math.inf)
    monkeypatch.setattr(train, "LossReadout", CountingReadout)
    CountingReadout.made.clear()


def test_a_nan_read_later_names_its_step_and_keeps_only_earlier_files(
    demo_model_dir, four_images, tmp_path, poisoned_step  # noqa: F811
):
    out = tmp_path / "run"
    config = config_for(demo_model_dir, four_images, out, **{
        "train.steps": 20, "output.save_every_n_steps": 5})
    with pytest.raises(UserError, match=f"The loss became nan at step {BAD_STEP}: training "
                                        "diverged") as failure:
        run(config)
    assert str(out) in str(failure.value)
    # Read at the save of step 5, then at step 10 (every 10 steps): two reads, not ten.
    (readout,) = CountingReadout.made
    assert readout.every == 10 and readout.reads == 2
    # The file of step 5 is kept and finite; nothing was written after the NaN.
    saved = sorted(p.name for p in out.glob("*.safetensors"))
    assert saved == ["test-step000005.safetensors"]
    assert all(torch.isfinite(t).all() for t in load_file(out / saved[0]).values())
    # The steps before the NaN are logged, with their own losses; none after.
    logged = metrics(out)
    assert [m["step"] for m in logged] == list(range(1, BAD_STEP))
    assert all(math.isfinite(m["loss"]) and m["loss"] > 0 for m in logged)


def test_reading_every_step_or_every_ten_logs_the_same_losses(
    demo_model_dir, four_images, tmp_path, monkeypatch  # noqa: F811
):
    import trainer.train as train

    monkeypatch.setattr(train, "READ_EVERY_S", math.inf)
    monkeypatch.setattr(train, "LossReadout", functools.partial(loss_readout.LossReadout, every=1))
    every_step = run(config_for(demo_model_dir, four_images, tmp_path / "a", **{
        "train.steps": 12}))
    monkeypatch.setattr(train, "LossReadout", loss_readout.LossReadout)
    every_ten = run(config_for(demo_model_dir, four_images, tmp_path / "b", **{
        "train.steps": 12}))
    assert len(every_ten.losses) == 12
    assert every_ten.losses == every_step.losses
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert [(m["step"], m["loss"], m["lr"]) for m in a] == [
        (m["step"], m["loss"], m["lr"]) for m in b]


def test_the_readout_reads_when_due():
    readout = loss_readout.LossReadout(every=3, every_s=math.inf)
    for step in (1, 2):
        readout.add(step, torch.tensor(float(step)), lr=0.1, epoch=0)
        assert not readout.due()
    readout.add(3, torch.tensor(3.0), lr=0.1, epoch=0)
    assert readout.due()
    records = readout.read()
    assert [(r.step, r.loss) for r in records] == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert readout.reads == 1 and readout.read() == [] and readout.reads == 1
    timed = loss_readout.LossReadout(every=100, every_s=0.0)
    assert not timed.due()  # nothing pending
    timed.add(1, torch.tensor(1.0), lr=0.1, epoch=0)
    assert timed.due()
    kept, bad = loss_readout.checked(records + [
        loss_readout.StepRecord(4, math.inf, 0.1, 0, 1.0)])
    assert (len(kept), bad.step) == (3, 4)
