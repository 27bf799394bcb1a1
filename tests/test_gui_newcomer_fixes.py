"""What a newcomer's walk through the page showed, fixed: the "New here?" box
stays hidden once any run exists, the Export tab selects the newest file
(and counts in good English), and the Preview tab's steps and guidance boxes
start empty, empty meaning the default."""

from __future__ import annotations

import gradio as gr
import pytest

from core.errors import UserError
from gui import exports
from gui.datadir import DataDirs
from gui.jobs import JobRunner
from gui.preview_tab import optional_number, sample_arguments
from tests.test_gui_app import FAKE, form_values, served


@pytest.fixture
def fresh_app(tmp_path):
    """The page over a data folder of its own, with no run yet."""
    dirs = DataDirs(tmp_path / "data").create()
    runner = JobRunner(dirs.jobs, trainer=FAKE, env={"FAKE_STEP_SECONDS": "0.05"})
    with served(dirs, runner) as (client, ui):
        yield client, dirs, runner, ui


def frame_shown(ui) -> list[bool]:
    """What the page's handlers for the outer welcome box say now: on load (a
    visit or a reload) and when the model path changes (the Train tab shows
    the inner box again for an empty path)."""
    handlers = [f for f in ui.fns.values()
                if [o.elem_id for o in f.outputs] == ["welcome-frame"]]
    assert sorted(event for f in handlers for _, event in f.targets) == ["change", "load"]
    return [next(iter(f.fn().values())).visible for f in handlers]


def component(ui, elem_id: str):
    return next(b for b in ui.blocks.values() if getattr(b, "elem_id", None) == elem_id)


def finished_run(client, runner, name: str):
    client.predict(None, *form_values(client, train__steps=2, output__name=name),
                   api_name="/start")
    return runner.wait(runner.latest().id, 60)


def test_the_welcome_box_stays_hidden_once_a_run_exists(fresh_app) -> None:
    client, dirs, runner, ui = fresh_app
    # The Train tab's own box (shown for an empty model path) is inside the frame.
    assert component(ui, "welcome").parent is component(ui, "welcome-frame")
    assert not exports.any_run(dirs, runner)
    assert frame_shown(ui) == [True, True]  # a first visit: offered
    finished_run(client, runner, "first")
    assert exports.any_run(dirs, runner)
    # A reload no longer shows it, nor does clearing the model path.
    assert frame_shown(ui) == [False, False]
    # A restarted app finds the run in its jobs folder.
    assert exports.any_run(dirs, JobRunner(dirs.jobs, trainer=FAKE))


def test_an_adapter_in_the_outputs_counts_as_a_run(tmp_path) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    dirs = DataDirs(tmp_path / "data").create()
    runner = JobRunner(dirs.jobs, trainer=FAKE)
    assert not exports.any_run(dirs, runner)
    (dirs.outputs / "old").mkdir()
    save_file({"lora_unet_x.lora_down.weight": np.zeros((4, 320), dtype=np.float16),
               "lora_unet_x.alpha": np.array(4.0, dtype=np.float16)},
              dirs.outputs / "old" / "old.safetensors")  # e.g. trained by the CLI
    assert exports.any_run(dirs, runner)


def test_the_export_tab_selects_the_newest_file_and_counts_right(fresh_app) -> None:
    client, _, runner, _ = fresh_app
    empty, status = client.predict(api_name="/list_adapters")
    assert empty["value"] is None and status.startswith("No adapter files yet")
    first = finished_run(client, runner, "older")
    listed, status = client.predict(api_name="/list_adapters")
    assert listed["value"] == first.final_file and status == "**Done:** 1 adapter file."
    second = finished_run(client, runner, "newer")
    listed, status = client.predict(None, api_name="/list_adapters")
    assert listed["value"] == second.final_file and status == "**Done:** 2 adapter files."
    # A file the user chose stays chosen when the list is refreshed (e.g. on the tab).
    listed, _ = client.predict(first.final_file, api_name="/list_adapters")
    assert listed["value"] == first.final_file


def test_the_choice_after_a_refresh() -> None:
    assert exports.chosen_after_refresh(["/new", "/old"], None) == "/new"
    assert exports.chosen_after_refresh(["/new", "/old"], "/old") == "/old"
    assert exports.chosen_after_refresh(["/new"], "/deleted") == "/new"
    assert exports.chosen_after_refresh([], "/deleted") is None
    assert [exports.files_found(n) for n in (0, 1, 2)] == [
        "0 adapter files.", "1 adapter file.", "2 adapter files."]


def test_the_preview_boxes_start_empty(fresh_app) -> None:
    *_, ui = fresh_app
    for elem_id in ("pv-steps", "pv-guidance"):
        box = component(ui, elem_id)
        # A number box shows (and sends) 0 when it has no value.
        assert isinstance(box, gr.Textbox) and box.value == ""


ARGS = ("demo", "", "", "", "a cat", "", 1)


def test_empty_steps_and_guidance_leave_the_cli_defaults(tmp_path) -> None:
    for empty in ("", "  ", None):
        args = sample_arguments(*ARGS, empty, empty, "64x64", out=tmp_path / "x.png")
        assert "--steps" not in args and "--guidance" not in args
    args = sample_arguments(*ARGS, "3", "0", "64x64", out=tmp_path / "x.png")
    assert args[args.index("--steps") + 1] == "3"
    assert args[args.index("--guidance") + 1] == "0.0"  # typed 0: no CFG, as asked
    args = sample_arguments(*ARGS, 2, 7.5, "64x64", out=tmp_path / "x.png")  # the API's numbers
    assert (args[args.index("--steps") + 1], args[args.index("--guidance") + 1]) == ("2", "7.5")


@pytest.mark.parametrize(("value", "label", "kind", "message"), [
    ("many", "Steps", int, "Steps 'many' is not a whole number such as 20; leave it empty"),
    ("2.5", "Steps", int, "Steps '2.5' is not a whole number"),
    ("nan", "Guidance", float, "Guidance 'nan' is not a number such as 7.5"),
    ("high", "Guidance", float, "Guidance 'high' is not a number such as 7.5"),
])  # fmt: skip
def test_a_box_that_is_not_a_number_is_refused_clearly(value, label, kind, message) -> None:
    with pytest.raises(UserError, match=message):
        optional_number(value, label, kind)


def test_empty_boxes_reach_the_sample_cli_as_its_defaults(fresh_app, monkeypatch) -> None:
    """Through the page's handler, as the browser sends them: empty text."""
    from gui import preview_tab
    from gui.cli_runs import CliResult

    client, *_ = fresh_app
    commands = []
    monkeypatch.setattr(preview_tab, "run_cli",
                        lambda command, *a, **k: commands.append(command) or CliResult(0, "", ""))
    _, status = client.predict("demo", "", "", "", "a red circle", "", 1, "", "", "64x64",
                               api_name="/generate")
    assert status.startswith("**Done:**")
    assert "--prompt" in commands[0] and "--steps" not in commands[0]
    assert "--guidance" not in commands[0]
