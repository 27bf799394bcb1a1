"""Every action of the page through its API (gradio_client), against the app
served in this process. Training uses a fake trainer with the real CLI's
arguments and messages (tests/gui_fake_trainer.py); the dataset check,
inspection and sampling run the real CLIs."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
import tomllib
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from app import check_exposure, parse_args
from core.errors import UserError
from gui.datadir import DataDirs
from gui.form import KEYS
from gui.jobs import JobRunner, Status
from tests.test_gui_jobs import wait_for
from trainer.config import load_config, preset_paths

FAKE = [sys.executable, str(Path(__file__).with_name("gui_fake_trainer.py"))]


def steps_in(folder: Path) -> list[int]:
    path = folder / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] \
        if path.exists() else []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(dirs: DataDirs, runner: JobRunner):
    """The page over `dirs` on a free port: (its API client, the Blocks)."""
    from gradio_client import Client

    from gui.app import build_ui

    ui = build_ui(dirs, runner)
    port = free_port()
    ui.launch(server_port=port, prevent_thread_lock=True, quiet=True,
              allowed_paths=[str(dirs.root)])
    try:
        yield Client(f"http://127.0.0.1:{port}/", verbose=False), ui
    finally:
        runner.shutdown(timeout=30)
        ui.close()


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("gui")
    saved = os.environ.get("LORA_TRAINER_CACHE")
    os.environ["LORA_TRAINER_CACHE"] = str(root / "cache")  # the children's demo assets
    dirs = DataDirs(root / "data").create()
    runner = JobRunner(dirs.jobs, trainer=FAKE, env={"FAKE_STEP_SECONDS": "0.1"})
    with served(dirs, runner) as (client, _):
        yield client, dirs, runner, root
    if saved is None:
        os.environ.pop("LORA_TRAINER_CACHE")
    else:
        os.environ["LORA_TRAINER_CACHE"] = saved


def form_values(client, **changes) -> list:
    values = list(client.predict(api_name="/load_demo")[: len(KEYS)])
    for key, value in changes.items():
        values[KEYS.index(key.replace("__", "."))] = value
    return values


def poll(client, until: str, timeout: float = 60, where: int = 0) -> tuple:
    """refresh until output `where` (0: the job status, 1: progress, 6: the
    job picker) shows `until`; unchanged outputs come back as updates, so the
    last real value of each is kept."""
    shown: list = [""] * 7
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = client.predict(None, api_name="/refresh")
        shown = [new.get("value", old) if isinstance(new, dict) and new.get("__type__")
                 == "update" else new for old, new in zip(shown, result, strict=True)]
        if until in str(shown[where]):
            return tuple(shown)
        time.sleep(0.2)
    raise AssertionError(f"never showed {until!r}; last: {shown[0]}")


def test_the_first_screen_offers_the_demo(app):
    client, dirs, _, _ = app
    out = client.predict(api_name="/load_demo")
    values = dict(zip(KEYS, out, strict=False))
    assert values["model.path"] == "demo-shapes" and values["dataset.path"] == "demo-mychar"
    assert values["output.dir"] == str(dirs.outputs / "{name}")
    assert "The demo settings are in the form" in out[len(KEYS) + 1]
    assert out[len(KEYS) + 2] == str(preset_paths()["demo-learns"])


def test_a_preset_keeps_the_paths_entered(app):
    client, *_ = app
    out = client.predict(str(preset_paths()["sd15-loha"]), "/my/model.safetensors", "/my/data",
                         api_name="/load_preset")
    values = dict(zip(KEYS, out, strict=False))
    assert values["model.path"] == "/my/model.safetensors" and values["network.type"] == "loha"
    assert out[len(KEYS)] == "loha"  # the Adapter dropdown follows


def test_start_progress_stop_resume(app):
    client, dirs, _, _ = app
    values = form_values(client, train__steps=60, output__name="flow", sample__every_n_steps=5)
    status = client.predict(None, *values, api_name="/start")
    assert "started" in status and "python -m trainer train" in status
    shown = poll(client, "Step", where=1)
    assert "Training" in shown[0] and " / 60** · " in shown[1]
    assert "Stopping job" in client.predict(api_name="/stop")
    shown = poll(client, "Stopped")
    assert "the state is saved. Press Resume" in shown[0]
    resumed = client.predict(shown[6], *values, api_name="/resume")
    assert "resumes flow" in resumed and resumed.rstrip("`\n").endswith("--resume")
    shown = poll(client, "Finished")
    assert "Step 60 / 60" in shown[1]
    assert [row[0] for row in shown[2]["data"]] == list(range(1, 61))  # the loss plot
    assert len(shown[3]) == 8 and Path(shown[3][0]["image"]).suffix == ".png"  # newest previews
    assert "done: 60 steps" in shown[4]
    assert (dirs.outputs / "flow" / "flow.safetensors").is_file()
    # Another tab (or a reloaded page) sees the same job.
    from gradio_client import Client

    assert "Job" in Client(client.src, verbose=False).predict(None, api_name="/refresh")[0]
    # Starting the same run again would overwrite it: refused, with a way out.
    again = client.predict(None, *values, api_name="/start")
    assert "already holds an earlier run of flow" in again and "flow-2" in again


def test_the_job_picker_resumes_the_chosen_job_not_the_latest(app):
    client, _, runner, _ = app
    stopped = []
    for name in ("pick-a", "pick-b"):
        values = form_values(client, train__steps=300, output__name=name,
                             sample__every_n_steps=0)
        client.predict(None, *values, api_name="/start")
        job = runner.latest()
        wait_for(lambda job=job: steps_in(Path(job.output_dir)))
        client.predict(api_name="/stop")
        stopped.append(runner.wait(job.id, 30))
    first, latest = stopped
    assert first.status is latest.status is Status.STOPPED
    shown = poll(client, f"Job {latest.id}")
    assert shown[6] == latest.id  # the picker offers the newest stopped job first
    # The form still holds pick-b; the picker says pick-a.
    status = client.predict(first.id, *values, api_name="/resume")
    assert "resumes pick-a" in status, status
    resumed = runner.latest()
    assert resumed.output_dir == first.output_dir and resumed.arguments()[-1] == "--resume"
    runner.stop(resumed.id)
    assert runner.wait(resumed.id, 30).status is Status.STOPPED
    steps = steps_in(Path(first.output_dir))
    assert steps == list(range(1, len(steps) + 1))  # continued, one trainer at a time
    assert client.predict(first.id - 1000, *values, api_name="/resume") == (
        f"**Problem:** There is no job {first.id - 1000}; choose one under Job to resume.")


def test_resume_without_a_picked_job_continues_the_run_in_the_form(app):
    """A run this app never started (e.g. from the command line): Resume with an
    empty picker continues the form's output folder, and refuses a finished one."""
    client, dirs, runner, _ = app
    (dirs.outputs / "from-cli" / "state" / "state-00000004").mkdir(parents=True)
    finished = form_values(client, train__steps=4, output__name="from-cli")
    assert client.predict(None, *finished, api_name="/resume") == (
        "**Problem:** from-cli already finished its 4 steps; raise train.steps to train it "
        "further, then press Resume.")
    values = form_values(client, train__steps=6, output__name="from-cli",
                         sample__every_n_steps=0)
    assert "resumes from-cli" in client.predict(None, *values, api_name="/resume")
    job = runner.wait(runner.latest().id, 30)
    assert job.status is Status.DONE and job.arguments()[-1] == "--resume"
    assert steps_in(dirs.outputs / "from-cli") == [5, 6]  # continued from the saved step


@pytest.mark.parametrize(("changes", "message"), [
    ({"train__steps": -1}, "**Problem:** train.steps = -1 is out of range; it must be at least 0."),
    ({"model__path": "/no/model.safetensors"}, 'model.path = "/no/model.safetensors" does not'),
    ({"train__batch_size": None}, "train.batch_size is empty"),
])  # fmt: skip
def test_start_refuses_bad_settings_with_the_reason(app, changes, message):
    client, *_ = app
    status = client.predict(None, *form_values(client, **changes), api_name="/start")
    assert status.startswith("**Problem:**") and message.replace("**Problem:** ", "") in status


def test_start_shows_the_report_of_an_untrainable_dataset(app, tmp_path):
    client, _, runner, _ = app
    (tmp_path / "broken.png").write_bytes(b"not a png")
    jobs = len(runner.jobs())
    status = client.predict(None, *form_values(client, dataset__path=str(tmp_path)),
                            api_name="/start")
    assert "cannot be trained on yet; nothing was started" in status
    assert "### Not trainable" in status and "| broken.png | not an image" in status
    assert len(runner.jobs()) == jobs


def test_a_crashed_run_is_explained(app):
    client, _, runner, _ = app
    runner.env["FAKE_TRAINER_MODE"] = "crash"
    try:
        client.predict(None, *form_values(client, output__name="crash"), api_name="/start")
        shown = poll(client, "Failed")
    finally:
        runner.env.pop("FAKE_TRAINER_MODE")
    assert "**Problem:** The trainer was killed (SIGKILL)" in shown[0]
    assert "out of memory" in shown[0]


def test_save_preset_and_show_config(app):
    client, dirs, _, _ = app
    values = form_values(client, train__steps=11)
    status, choice = client.predict("my fast", *values, api_name="/save_preset")
    assert "Saved the preset" in status
    saved = dirs.presets / "my-fast.toml"
    assert tomllib.loads(saved.read_text())["train"] == {
        "steps": 11, "batch_size": 4, "unet_lr": 0.002, "text_encoder_lr": 0.002}
    assert client.predict(str(saved), "", "", api_name="/load_preset")[KEYS.index("train.steps")] \
        == 11
    toml, _ = client.predict(*values, api_name="/show_config")
    shown = dirs.root / "shown.toml"
    shown.write_text(toml["value"] if isinstance(toml, dict) else toml)
    assert load_config(shown).train.steps == 11


def test_dataset_actions(app):
    client, dirs, _, _ = app
    folder, gallery, image, status = client.predict(".txt", api_name="/copy_demo")
    assert folder == str(dirs.datasets / "demo-shapes") and "demo images are in" in status
    assert len(gallery) == 9
    first = image["choices"][0][0]
    caption, _ = client.predict(folder, first, ".txt", api_name="/read_caption")
    assert caption.startswith("demoshape, ")
    *_, status, caption = client.predict(folder, first, "a new caption", ".txt",
                                         api_name="/save_caption")
    assert "Saved" in status and (Path(folder) / first).with_suffix(".txt").read_text() \
        == "a new caption\n"
    *_, status = client.predict(folder, "sks", ".txt", api_name="/add_trigger")
    assert "Added 'sks' to 9 captions" in status
    *_, status = client.predict(folder, "plain background", "", ".txt", api_name="/replace_tag")
    assert "Changed 8 captions" in status
    report = client.predict(folder, ".txt", 64, False, 256, 1024, 64, False,
                            api_name="/check_dataset")
    assert report.startswith("### Trainable: 9 images") and "| sks | 9 |" in report
    path, status = client.predict(folder, api_name="/use_dataset")
    assert path == folder and "now trains on" in status
    *_, status = client.predict("/no/such/folder", ".txt", api_name="/open_dataset")
    assert status == "**Problem:** /no/such/folder does not exist; enter the path of a folder " \
                     "of images."


def test_upload_a_zip(app, tmp_path):
    from gradio_client import handle_file

    client, dirs, _, _ = app
    Image.new("RGB", (64, 64)).save(tmp_path / "x.png")
    with zipfile.ZipFile(tmp_path / "set.zip", "w") as z:
        z.write(tmp_path / "x.png", "x.png")
        z.writestr("x.txt", "a caption")
    folder, gallery, *_, status = client.predict([handle_file(str(tmp_path / "set.zip"))],
                                                 "zipped", ".txt", api_name="/upload")
    assert folder == str(dirs.datasets / "zipped") and "Added 2 files" in status
    assert gallery[0]["caption"] == "x.png: a caption"


def test_export_actions(app, tmp_path):
    client, dirs, runner, _ = app
    client.predict(None, *form_values(client, train__steps=2, output__name="exp"),
                   api_name="/start")
    job = runner.wait(runner.latest().id, 60)
    choices, _ = client.predict(api_name="/list_adapters")
    paths = [value for _, value in choices["choices"]]
    assert job.final_file in paths
    summary, _, download, title, trigger, _ = client.predict(job.final_file,
                                                             api_name="/select_adapter")
    assert "stable-diffusion-v1/lora" in summary and title == "exp"
    assert Path(download).read_bytes() == Path(job.final_file).read_bytes()
    status, download, title, trigger, description = client.predict(
        job.final_file, "Exported", "sks", "words", api_name="/save_metadata")
    assert "tensor data and hashes are unchanged" in status
    from gui.safetensors_meta import read_metadata

    meta = read_metadata(download)
    assert (meta["modelspec.title"], meta["modelspec.trigger_phrase"]) == ("Exported", "sks")
    lora_dir = tmp_path / "Lora"
    lora_dir.mkdir()
    status = client.predict(job.final_file, str(lora_dir), False, api_name="/copy_adapter")
    assert "Copied to" in status and (lora_dir / "exp.safetensors").is_file()
    listed = client.predict(api_name="/list_preview_adapters")
    assert job.final_file in [value for _, value in listed["choices"]]


def test_preview_generates_with_the_sample_cli(app, tmp_path):
    client, dirs, _, _ = app
    gallery, status = client.predict("demo", "", "", "", "a red circle", "", 1, 2, None,
                                     "64x64", api_name="/generate")
    assert status.startswith("**Done:**") and len(gallery) == 1
    assert Image.open(gallery[0]["image"]).size == (64, 64)
    _, status = client.predict("demo", str(tmp_path / "none.safetensors"), "", "", "x", "", 1, 2,
                               None, "64x64", api_name="/generate")
    assert status == f"**Problem:** --lora: {tmp_path}/none.safetensors does not exist; " \
                     "expected a LoRA .safetensors file."
    _, status = client.predict("demo", "", "", str(tmp_path / "taesd"), "x", "", 1, 2, None,
                               "64x64", api_name="/generate")
    assert status.startswith(f"**Problem:** --preview-decoder = {tmp_path}/taesd is not a folder")


@pytest.mark.parametrize(("argv", "error"), [
    (["--share"], "--share makes the app reachable from other machines"),
    (["--host", "0.0.0.0"], "--host 0.0.0.0 makes the app reachable"),
    (["--host", "0.0.0.0", "--auth", "alice"], "--auth expects USER:PASS"),
])  # fmt: skip
def test_exposing_the_app_needs_a_login(argv, error):
    with pytest.raises(UserError, match=error):
        check_exposure(parse_args(argv))


def test_a_login_is_passed_on():
    assert check_exposure(parse_args(["--host", "0.0.0.0", "--auth", "a:b:c"])) == ("a", "b:c")
    assert check_exposure(parse_args([])) is None
