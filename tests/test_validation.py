"""The validation loss (trainer/validation.py): a deterministic split, a loss
that only the adapter moves, and a run that logs it at its steps, in
TensorBoard and as its best step with that step's file; the GUI plots it."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from core.errors import UserError
from tests.test_train import config_for, metrics
from trainer import train_setup as setup
from trainer.step_loss import StepContext
from trainer.validation import (
    Validator,
    fixed_timesteps,
    held_out,
    planned_steps,
    split_items,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """See tests/conftest.py: two threads on the shared 2 cores spin against each other."""


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Four captioned demo images: two to train on, two held out at split 0.5."""
    from trainer.demo_assets import write_demo_dataset

    root = tmp_path_factory.mktemp("data") / "all"
    write_demo_dataset(root, size=64)
    for image in sorted((root / "4_demoshape").glob("*.png"))[4:]:
        image.unlink()
        image.with_suffix(".txt").unlink()
    return root


def test_the_split_is_chosen_by_the_seed_and_disjoint_from_training():
    items = list(range(10))
    train, validation = split_items(items, 0.3, seed=7)
    assert len(validation) == 3 and sorted(train + validation) == items
    assert not set(train) & set(validation)
    assert split_items(items, 0.3, seed=7) == (train, validation)
    others = {tuple(split_items(items, 0.3, seed=s)[1]) for s in range(8)}
    assert len(others) > 1  # the seed chooses
    assert split_items(items, 0.0, seed=7) == (items, [])
    assert split_items(items, 0.01, seed=7)[1] != []  # a set, once asked for, is not empty
    with pytest.raises(UserError, match="leaves nothing to train on"):
        split_items([1, 2], 0.9, seed=7)


def test_held_out_images_leave_the_run_and_its_plan(demo_model_dir, images, tmp_path):
    config = config_for(demo_model_dir, images, tmp_path, **{"dataset.validation_split": 0.5})
    report = setup.check_dataset_or_refuse(config)
    trained, validation = held_out(config, report)
    assert len(trained.items) == 2 and len(validation) == 2 and len(report.items) == 4
    assert {i.path for i in trained.items}.isdisjoint(i.path for i in validation)
    from trainer.run_plan import resolve_run

    plan = resolve_run(config)
    assert len(plan["dataset"]["items"]) == 2
    assert sorted(p for p, _ in plan["validation"]["items"]) == sorted(
        str(i.path) for i in validation)
    assert plan["validation"]["steps"] == [20]  # every_n_steps 0: at the end only


def test_validation_steps_and_timesteps():
    config = config_for_steps(6, every=4)
    assert planned_steps(config, True, 6) == [4, 6]
    assert planned_steps(config, False, 6) == []
    assert fixed_timesteps(1000).tolist() == [125, 375, 625, 875]


def config_for_steps(steps, every):
    from trainer.config import load_config

    return load_config(None, ["model.path=\"demo\"", "dataset.path=\"demo\"",
                              f"train.steps={steps}", f"train.validate_every_n_steps={every}",
                              "dataset.validation_split=0.25"])


@pytest.mark.parametrize("overrides, message", [
    ({"dataset.validation_split": 0.2, "dataset.validation_path": "val"}, "set only one"),
    ({"train.validate_every_n_steps": 2}, "has no validation images"),
    ({"dataset.validation_split": 0.2, "task": "lcm_distill"}, "lcm_distill"),
])  # fmt: skip
def test_contradicting_settings_are_refused(overrides, message):
    from trainer.config import load_config

    with pytest.raises(UserError, match=message):
        load_config(None, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])


def test_the_same_adapter_scores_the_same_and_a_changed_one_does_not(
    demo_model_dir, demo_sd, images, tmp_path
):
    config = config_for(demo_model_dir, images, tmp_path, **{
        "dataset.validation_split": 0.5, "network.dropout": 0.5})  # fmt: skip
    sd = copy.deepcopy(demo_sd)
    _, items = held_out(config, setup.check_dataset_or_refuse(config))
    network = setup.build_network(config, sd)
    try:
        validator = Validator(config, items, sd)
        ctx = StepContext(torch.device("cpu"), "no")
        network.train()
        sd.unet.train()
        first = validator.loss(config, sd, network, ctx)
        assert validator.loss(config, sd, network, ctx) == first  # bit-equal: dropout off
        assert network.training and sd.unet.training  # the training modes are restored
        with torch.no_grad():
            for parameter in network.parameters():
                parameter.add_(0.05)
        changed = validator.loss(config, sd, network, ctx)
        assert changed != first and abs(changed - first) > 1e-6
    finally:
        network.detach()


def test_a_short_run_logs_val_loss_at_its_steps_with_the_best_file(
    demo_model_dir, demo_sd, images, tmp_path
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.train_helpers import with_adapter
    from trainer.train import run

    config = config_for(demo_model_dir, images, tmp_path, **{
        "train.steps": 6, "train.validate_every_n_steps": 2, "dataset.validation_split": 0.5,
        "output.save_every_n_steps": 2, "train.unet_lr": 3e-3})  # fmt: skip
    result = run(config)
    lines = metrics(tmp_path)
    validation = [(m["step"], m["val_loss"]) for m in lines if "val_loss" in m]
    assert [step for step, _ in validation] == [2, 4, 6]
    assert [m["step"] for m in lines if "loss" in m] == [1, 2, 3, 4, 5, 6]

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = [(e.step, e.value) for e in events.Scalars("val/loss")]
    assert scalars == [(s, pytest.approx(v, rel=1e-6)) for s, v in validation]

    record = json.loads((tmp_path / "validation.json").read_text())
    best_step, best_loss = min(validation, key=lambda entry: entry[1])
    assert (record["best_step"], record["best_val_loss"]) == (best_step, best_loss)
    expected = result.final_file if best_step == 6 else tmp_path / f"test-step{best_step:06d}"
    assert record["best_file"] == expected.with_suffix(".safetensors").name
    assert (tmp_path / record["best_file"]).is_file()

    # A second route: the step-4 file, scored afresh, gives the logged value.
    _, items = held_out(config, setup.check_dataset_or_refuse(config))
    with with_adapter(demo_sd, tmp_path / "test-step000004.safetensors") as adapted:
        fresh = Validator(config, items, adapted).loss(
            config, adapted, _NoNetwork(), StepContext(torch.device("cpu"), "no"))
    assert fresh == pytest.approx(dict(validation)[4], rel=1e-5)


class _NoNetwork(torch.nn.Module):
    """The adapter is already attached to the copied model."""


def test_a_resumed_record_keeps_the_evaluations_before_its_step(tmp_path):
    from trainer.validation import BestRecord

    path = tmp_path / "validation.json"
    path.write_text(json.dumps({"history": [[2, 0.5], [4, 0.3], [6, 0.4]]}))
    assert BestRecord.resumed(path, 4).history == [(2, 0.5), (4, 0.3)]
    assert BestRecord.resumed(path, 0).history == []


def test_the_gui_plot_has_both_series_and_names_the_best(tmp_path):
    from gui.run_files import MetricsReader, best_validation
    from gui.train_tab import loss_frame, loss_plot

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 1, "loss": 0.9, "lr": 1e-3}, {"step": 2, "loss": 0.8, "lr": 1e-3},
        {"step": 2, "val_loss": 0.7}, {"step": 3, "loss": 0.6, "lr": 1e-3},
        {"step": 4, "val_loss": 0.65}]))  # fmt: skip
    reader = MetricsReader(path)
    rows = reader.read()
    assert [r.step for r in rows] == [1, 2, 3]  # progress reads training steps only
    frame = loss_frame(rows, reader.validation)
    by_series = {name: list(zip(part.step, part.loss, strict=True))
                 for name, part in frame.groupby("series")}
    assert by_series == {"train": [(1, 0.9), (2, 0.8), (3, 0.6)],
                         "validation": [(2, 0.7), (4, 0.65)]}
    assert list(loss_frame([]).dtypes) == ["int64", "float64", "object"]
    update = loss_plot(rows, reader.validation, "Validation best: step 4")
    assert update.colors_in_legend == ["train", "validation"]  # both named in the legend
    assert update.caption == "Validation best: step 4"
    assert loss_plot(rows).colors_in_legend == ["train"]
    empty = loss_plot([], [])
    assert empty.colors_in_legend is None and empty.caption is None
    (tmp_path / "validation.json").write_text(json.dumps(
        {"best_step": 4, "best_val_loss": 0.65, "best_file": "x-step000004.safetensors"}))
    assert best_validation(tmp_path / "validation.json") == (
        "Validation best: step 4 (loss 0.6500, x-step000004.safetensors)")
    assert best_validation(tmp_path / "missing.json") == ""


def test_a_new_run_drops_the_last_runs_best_and_a_resumed_one_keeps_it(tmp_path):
    from trainer.run_outputs import RunOutputs

    outputs = RunOutputs(tmp_path, "x")
    stale = outputs.layout.validation
    stale.write_text('{"best_step": 4}')
    outputs.start_metrics(4)
    outputs.close()
    assert stale.read_text() == '{"best_step": 4}'
    outputs.start_metrics(0)
    outputs.close()
    assert not stale.exists()
