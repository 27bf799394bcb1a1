"""`sample.compare`: the with/without-adapter grid of a real run on the demo
model, its cells against the run's previews and a plain base-model sample."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from core.run_layout import RunLayout, is_preview
from trainer.compare_grid import (
    HEADER_HEIGHT,
    LABEL_WIDTH,
    MAX_ROWS,
    grid_image,
    kept_rows,
    loaded,
    preview_rows,
)
from trainer.config import PRESETS_DIR, load_config

SIZE = 64  # the demo's dataset.resolution: every sample's size
PROMPTS = ["a photo of a cat", "a red square"]


def config_of(out: Path, **overrides):
    values = {"train.steps": 2, "train.batch_size": 1, "dataset.cache_latents": "off",
              "train.unet_lr": 1e-2, "sample.prompts": PROMPTS, "sample.every_n_steps": 1,
              "sample.steps": 1, "sample.compare": True, "output.dir": str(out),
              "output.name": "compare", **overrides}
    return load_config(PRESETS_DIR / "cpu-demo.toml",
                       [f"{k}={json.dumps(v)}" for k, v in values.items()])


def run_spied(config) -> list:
    """Run `config`, returning the settings of every `generate` call."""
    from trainer import sampling
    from trainer.train import run

    calls, original = [], sampling.generate

    def spy(sd, settings):
        calls.append(settings)
        return original(sd, settings)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sampling, "generate", spy)
        run(config)
    return calls


@pytest.fixture(scope="module")
def compared(tmp_path_factory, one_torch_thread) -> SimpleNamespace:
    out = tmp_path_factory.mktemp("compare") / "run"
    config = config_of(out)
    calls = run_spied(config)
    return SimpleNamespace(config=config, layout=RunLayout(out, "compare"), calls=calls)


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def cell(grid, row: int, column: int) -> np.ndarray:
    left, top = LABEL_WIDTH + column * SIZE, HEADER_HEIGHT + row * SIZE
    return pixels(grid.crop((left, top, left + SIZE, top + SIZE)))


def test_the_grid_has_a_row_per_sampling_point_and_a_pair_per_prompt(compared):
    grid = Image.open(compared.layout.compare_grid)
    # 2 sampling points (step 1, step 2 = the end) x 2 prompts x (with, without).
    assert grid.size == (LABEL_WIDTH + 2 * 2 * SIZE, HEADER_HEIGHT + 2 * SIZE) == (296, 142)
    assert not list(compared.layout.samples.glob(".*"))  # written atomically: no leftovers


def test_with_cells_are_the_runs_previews_and_without_cells_a_plain_base_sample(compared):
    from trainer.preview import preview_settings
    from trainer.sampling import generate
    from trainer.train_setup import load_model

    grid = Image.open(compared.layout.compare_grid)
    base = generate(load_model(compared.config, torch.device("cpu")),
                    preview_settings(compared.config))
    for row, step in enumerate((1, 2)):
        for prompt in range(2):
            with_cell, without_cell = cell(grid, row, 2 * prompt), cell(grid, row, 2 * prompt + 1)
            preview = pixels(Image.open(compared.layout.preview(step, prompt)))
            assert np.array_equal(with_cell, preview)
            assert np.array_equal(without_cell, pixels(base[prompt]))
            # Otherwise the two halves could be the same render.
            assert np.abs(with_cell - without_cell).max() > 0


def test_the_base_model_is_rendered_once_per_run_not_per_sampling_point(compared):
    # The previews at steps 1 and 2, and the one "without" set reused by both rows.
    assert len(compared.calls) == 3
    assert len({repr(settings) for settings in compared.calls}) == 1


def test_with_an_lcm_lora_both_halves_take_4_steps_without_cfg(compared, tmp_path):
    config = config_of(tmp_path / "lcm", **{"train.steps": 1, "sample.steps": 20,
                                            "sample.lcm_lora": str(compared.layout.final_file)})
    calls = run_spied(config)
    assert len(calls) == 2  # the previews, then the "without" set
    assert {(s.sampler, s.steps, s.guidance) for s in calls} == {("lcm", 4, 1.0)}
    grid = Image.open(RunLayout(tmp_path / "lcm").compare_grid)
    assert grid.size == (LABEL_WIDTH + 4 * SIZE, HEADER_HEIGHT + SIZE)


def test_prompts_of_different_sizes_are_centred_in_the_largest_slot():
    def solid(size, colour):
        return Image.new("RGB", size, colour)

    red, blue, green = (255, 0, 0), (0, 0, 255), (0, 255, 0)
    # Prompt 0 is 32 x 48, prompt 1 (--w 64 --h 16) is 64 x 16: slots of 64 x 48.
    rows = [(5, [solid((32, 48), red), solid((64, 16), blue)])]
    grid = grid_image(rows, [solid((32, 48), green), solid((64, 16), green)])
    assert grid.size == (LABEL_WIDTH + 4 * 64, HEADER_HEIGHT + 48)
    top = HEADER_HEIGHT
    assert grid.getpixel((LABEL_WIDTH + 16, top)) == red  # centred: 16 px each side
    assert grid.getpixel((LABEL_WIDTH + 15, top)) == (255, 255, 255)
    assert grid.getpixel((LABEL_WIDTH + 47, top + 47)) == red
    assert grid.getpixel((LABEL_WIDTH + 64 + 16, top + 24)) == green
    assert grid.getpixel((LABEL_WIDTH + 128, top + 16)) == blue  # 16 px above and below
    assert grid.getpixel((LABEL_WIDTH + 128, top + 15)) == (255, 255, 255)
    assert grid.getpixel((LABEL_WIDTH + 128 + 63, top + 31)) == blue
    assert grid.getpixel((LABEL_WIDTH + 192, top + 32)) == (255, 255, 255)


def test_rows_are_this_runs_complete_sampling_points_up_to_now(tmp_path):
    layout = RunLayout(tmp_path)
    layout.samples.mkdir()

    def preview(step, index):
        Image.new("RGB", (8, 8), (step, index, 0)).save(layout.preview(step, index))

    for step in (2, 4, 6, 8):
        preview(step, 0), preview(step, 1)
    preview(3, 0), preview(3, 1)  # not a sampling point of every 2 steps: another run's
    preview(5, 0)  # prompt 1 missing (a run with one prompt before)
    rows = preview_rows(layout, 6, every=2, prompts=2)
    assert [step for step, _ in rows] == [2, 4, 6]  # step 8 is past the current step
    assert rows[1][1] == [layout.preview(4, 0), layout.preview(4, 1)]
    assert [i.getpixel((0, 0)) for i in loaded(rows)[1][1]] == [(4, 0, 0), (4, 1, 0)]
    # A run's last step is a sampling point whatever `every` says.
    assert [step for step, _ in preview_rows(layout, 3, every=2, prompts=2)] == [2, 3]
    assert [step for step, _ in preview_rows(layout, 5, every=4, prompts=2)] == [4]
    many = list(range(30))
    assert kept_rows(many) == [0, *range(30 - MAX_ROWS + 1, 30)]
    assert len(kept_rows(many)) == MAX_ROWS and kept_rows(many[:MAX_ROWS]) == many[:MAX_ROWS]


def test_the_train_tabs_gallery_shows_the_grid_first(compared, tmp_path):
    from gui import exports
    from gui.job_record import Job, Status, save_job
    from gui.jobs import JobRunner
    from gui.monitor import Monitor

    layout = compared.layout
    folder = tmp_path / "jobs" / "0001"
    folder.mkdir(parents=True)
    save_job(Job(id=1, name="compare", config="", overrides=[], output_dir=str(layout.folder),
                 total_steps=2, status=Status.DONE, started_at=time.time(), folder=str(folder)))
    view = Monitor(JobRunner(tmp_path / "jobs", trainer=["false"])).view()
    assert [Path(p).name for p in view["samples"]] == [
        "compare.png", "step000002-1.png", "step000002-0.png", "step000001-1.png",
        "step000001-0.png"]
    # The gallery may serve it (a PNG named as a run's sample), as it does previews.
    assert is_preview(layout.compare_grid) and exports._is_preview(layout.compare_grid)
    assert not is_preview(layout.folder / "compare.png")  # not in a samples folder


def test_sample_cli_compare_puts_the_lora_image_beside_the_base_one(compared, tmp_path):
    from trainer.cli import main

    lora = str(compared.layout.final_file)
    common = ["sample", "--model", "demo", "--prompt", "a red square", "--steps", "2",
              "--size", f"{SIZE}x{SIZE}"]
    paths = {name: tmp_path / f"{name}.png" for name in ("compare", "with", "without")}
    assert main([*common, "--lora", lora, "--compare", "--out", str(paths["compare"])]) == 0
    assert main([*common, "--lora", lora, "--out", str(paths["with"])]) == 0
    assert main([*common, "--out", str(paths["without"])]) == 0
    grid = Image.open(paths["compare"])
    assert grid.size == (LABEL_WIDTH + 2 * SIZE, HEADER_HEIGHT + SIZE)
    assert np.array_equal(cell(grid, 0, 0), pixels(Image.open(paths["with"])))
    assert np.array_equal(cell(grid, 0, 1), pixels(Image.open(paths["without"])))
    assert np.abs(cell(grid, 0, 0) - cell(grid, 0, 1)).max() > 0
