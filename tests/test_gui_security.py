"""The page's path rules, through its API (gradio_client against the app
served in this process): every handler that takes a path refuses one outside
what it may read or write, with a message, and nothing outside changes or
appears in the folders Gradio serves. Also: what Gradio itself serves, and
cancelling a dataset scan or check from the page."""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from core.errors import UserError
from gui.datadir import DataDirs
from gui.form import KEYS
from gui.jobs import JobRunner

FAKE = [sys.executable, str(Path(__file__).with_name("gui_fake_trainer.py"))]
SECRETS = ("outside caption", "top secret", "4242")  # what must never come back


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def adapter(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"lora_unet_x.lora_down.weight": np.ones((2, 8), np.float16),
               "lora_unet_x.lora_up.weight": np.ones((8, 2), np.float16),
               "lora_unet_x.alpha": np.array(2.0, np.float16)}, path)
    return path


def base_model(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"model.diffusion_model.out.2.weight": np.ones((4, 4), np.float16)}, path)
    return path


def images(folder: Path, captions: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for stem, caption in captions.items():
        Image.new("RGB", (32, 32), (200, 10, 10)).save(folder / f"{stem}.png")
        (folder / f"{stem}.txt").write_text(caption)
    return folder


@dataclass
class App:
    client: object
    dirs: DataDirs
    gradio_dir: Path
    port: int
    mine: Path  # a dataset in the data folder, opened before each case
    data_adapter: Path  # an adapter a run of the app made


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from gradio_client import Client

    from gui.app import build_ui

    root = tmp_path_factory.mktemp("gui-security")
    saved = {k: os.environ.get(k) for k in ("LORA_TRAINER_CACHE", "GRADIO_TEMP_DIR")}
    os.environ["LORA_TRAINER_CACHE"] = str(root / "cache")
    os.environ["GRADIO_TEMP_DIR"] = str(root / "gradio")  # its upload and served-file folder
    dirs = DataDirs(root / "data").create()
    mine = images(dirs.datasets / "mine", {"a": "red, square", "b": "blue"})
    (mine / "b.tags").mkdir()  # not captions, though named like them
    (mine / "b.cap").write_bytes(b"\x00\x01\x02binary")
    data_adapter = adapter(dirs.outputs / "run" / "adapter.safetensors")
    base_model(dirs.outputs / "run" / "model.safetensors")
    runner = JobRunner(dirs.jobs, trainer=FAKE, env={"FAKE_STEP_SECONDS": "0.1"})
    ui = build_ui(dirs, runner)
    port = free_port()
    ui.launch(server_port=port, prevent_thread_lock=True, quiet=True,
              allowed_paths=[str(dirs.root)])
    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
    yield App(client, dirs, root / "gradio", port, mine, data_adapter)
    runner.shutdown(timeout=30)
    ui.close()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def outside(tmp_path, monkeypatch):
    """Files the page must not read or write; the server's home folder is in here."""
    out = tmp_path / "outside"
    images(out / "img", {"a": "outside caption", "b": "outside caption"})
    (out / "secret.txt").write_text("top secret")
    adapter(out / "adapter.safetensors")
    base_model(out / "model.safetensors")
    (out / "preset.toml").write_text("[train]\nsteps = 4242\n")
    (out / "webui" / "Lora").mkdir(parents=True)
    (out / "webui" / "Lora" / "adapter.safetensors").write_text("top secret, not an adapter")
    (out / "home").mkdir()
    (out / "etc-link").symlink_to("/etc")
    (out / "proc-link").symlink_to("/proc")
    monkeypatch.setenv("HOME", str(out / "home"))
    return out


def snapshot(*folders: Path) -> dict[str, bytes | None]:
    """Every path under `folders`, with the bytes of files (links not followed)."""
    found: dict[str, bytes | None] = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")) if folder.exists() else []:
            regular = path.is_file() and not path.is_symlink()
            found[str(path)] = path.read_bytes() if regular else None
    return found


def form_values(client) -> list:
    return list(client.predict(api_name="/load_demo")[: len(KEYS)])


def zip_slip(folder: Path) -> str:
    from gradio_client import handle_file

    archive = folder / "slip.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("../../../../outside/img/a.txt", "overwritten")
        z.writestr(str(folder / "outside" / "new.png"), "absolute")
    return handle_file(str(archive))


def raw_call(port: int, api: str, data: list) -> str:
    """An API call as any HTTP client can send it: gradio_client would upload a
    local file named in `data` itself, a remote client cannot."""
    base = f"http://127.0.0.1:{port}/gradio_api/call/{api}"
    request = urllib.request.Request(base, json.dumps({"data": data}).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        event = json.loads(response.read())["event_id"]
    with urllib.request.urlopen(f"{base}/{event}", timeout=30) as response:
        return response.read().decode()


def not_uploaded(app: App, path: Path) -> str:
    """Upload a server file the browser never uploaded: Gradio refuses to read it."""
    reference = {"path": str(path), "meta": {"_type": "gradio.FileData"}}
    return raw_call(app.port, "upload", [[reference], "stolen", ".txt"])


def check(client, folder) -> object:
    return client.predict(str(folder), ".txt", 64, False, 256, 1024, 64, False,
                          api_name="/check_dataset")


SYSTEM = "is a system folder, a whole disk or your home folder"
NOT_OPENED = "is not an opened dataset folder; press Open folder first"
NOT_CAPTION_EXT = "is not usable: it is the extension of an image, model, script or config file"
NOT_ADAPTER = "is not a LoRA/LyCORIS adapter file"
NOT_PRESET = "is not one of the presets offered here|is not in the list of choices"
# (handler, call(client, app, outside), what the page says); each refused.
CASES = [
    ("open_dataset", lambda c, a, o: c.predict("/", ".txt", api_name="/open_dataset"), SYSTEM),
    ("open_dataset", lambda c, a, o: c.predict("/etc", ".txt", api_name="/open_dataset"), SYSTEM),
    ("open_dataset", lambda c, a, o: c.predict(str(o / "etc-link"), ".txt",
                                               api_name="/open_dataset"), SYSTEM),
    ("open_dataset", lambda c, a, o: c.predict("~", ".txt", api_name="/open_dataset"), SYSTEM),
    ("use_dataset", lambda c, a, o: c.predict("/", api_name="/use_dataset"), SYSTEM),
    ("use_dataset", lambda c, a, o: c.predict("/usr/lib", api_name="/use_dataset"), SYSTEM),
    ("read_caption", lambda c, a, o: c.predict(str(o / "img"), "a.png", ".txt",
                                               api_name="/read_caption"), NOT_OPENED),
    ("save_caption", lambda c, a, o: c.predict(str(o / "img"), "a.png", "x", ".txt",
                                               api_name="/save_caption"), NOT_OPENED),
    *[("save_caption", lambda c, a, o, ext=ext: c.predict(str(a.mine), "a.png", "x", ext,
                                                          api_name="/save_caption"),
       NOT_CAPTION_EXT) for ext in (".png", "PNG", ".safetensors", ".py", ".sh")],
    ("save_caption", lambda c, a, o: c.predict(str(a.mine), "b.png", "x", ".tags",
                                               api_name="/save_caption"),
     r"b\.tags is not a caption file \(it is a link or a folder"),
    ("save_caption", lambda c, a, o: c.predict(str(a.mine), "b.png", "x", ".cap",
                                               api_name="/save_caption"),
     r"b\.cap is not a caption file \(it is not a UTF-8 text file"),
    ("add_trigger", lambda c, a, o: c.predict(str(o / "img"), "sks", ".txt",
                                              api_name="/add_trigger"), NOT_OPENED),
    ("add_trigger", lambda c, a, o: c.predict(str(a.mine), "sks", ".py",
                                              api_name="/add_trigger"), NOT_CAPTION_EXT),
    ("replace_tag", lambda c, a, o: c.predict(str(o / "img"), "outside caption", "x", ".txt",
                                              api_name="/replace_tag"), NOT_OPENED),
    ("check_dataset", lambda c, a, o: check(c, o / "img"), NOT_OPENED),
    ("check_dataset", lambda c, a, o: check(c, "/"), NOT_OPENED),
    ("upload", lambda c, a, o: not_uploaded(a, o / "secret.txt"), "event: error"),
    ("upload", lambda c, a, o: c.predict([zip_slip(o.parent)], "../../outside", ".txt",
                                         api_name="/upload"), "holds no images or captions"),
    ("load_preset", lambda c, a, o: c.predict(str(o / "preset.toml"), "", "",
                                              api_name="/load_preset"), NOT_PRESET),
    ("start", lambda c, a, o: c.predict(str(o / "preset.toml"), *form_values(c),
                                        api_name="/start"), NOT_PRESET),
    ("generate", lambda c, a, o: c.predict("demo", str(o / "secret.txt"), "", "", "x", "", 1, 2,
                                           None, "64x64", api_name="/generate"), NOT_ADAPTER),
    ("generate", lambda c, a, o: c.predict("demo", "", str(o / "model.safetensors") + ":1.0",
                                           "", "x", "", 1, 2, None, "64x64",
                                           api_name="/generate"), NOT_ADAPTER),
    ("select_adapter", lambda c, a, o: c.predict(str(o / "secret.txt"),
                                                 api_name="/select_adapter"), NOT_ADAPTER),
    ("select_adapter", lambda c, a, o: c.predict(str(o / "model.safetensors"),
                                                 api_name="/select_adapter"), NOT_ADAPTER),
    ("save_metadata", lambda c, a, o: c.predict(str(o / "adapter.safetensors"), "t", "w", "d",
                                                api_name="/save_metadata"),
     "is not in the data folder or the output folder of a run of this app"),
    ("save_metadata", lambda c, a, o: c.predict(str(a.dirs.outputs / "run" / "model.safetensors"),
                                                "t", "w", "d", api_name="/save_metadata"),
     NOT_ADAPTER),
    ("copy_adapter", lambda c, a, o: c.predict(str(o / "secret.txt"), str(a.dirs.outputs), True,
                                               api_name="/copy_adapter"), NOT_ADAPTER),
    ("copy_adapter", lambda c, a, o: c.predict(str(o / "model.safetensors"),
                                               str(a.dirs.outputs), True,
                                               api_name="/copy_adapter"), NOT_ADAPTER),
    *[("copy_adapter", lambda c, a, o, to=to: c.predict(str(a.data_adapter), to(o), True,
                                                        api_name="/copy_adapter"), SYSTEM)
      # Only folders no one can write to, or fake ones: a broken rule must not write to /etc.
      for to in (lambda o: "/proc", lambda o: "/sys/kernel", lambda o: str(o / "proc-link"),
                 lambda o: str(o / "home"), lambda o: "~")],
    ("copy_adapter", lambda c, a, o: c.predict(str(a.data_adapter), str(o / "webui" / "Lora"),
                                               True, api_name="/copy_adapter"),
     "exists and is not an adapter file; it is never replaced, even with 'Overwrite'"),
    ("copy_adapter", lambda c, a, o: c.predict(str(a.data_adapter), str(o / "missing"), True,
                                               api_name="/copy_adapter"),
     "missing does not exist; enter the path of an existing folder"),
]  # fmt: skip


@pytest.mark.parametrize(("handler", "call", "message"), CASES,
                         ids=[f"{case[0]}-{i}" for i, case in enumerate(CASES)])
def test_a_path_outside_what_a_handler_may_use_is_refused(app, outside, handler, call, message):
    import re

    client = app.client
    client.predict(str(app.mine), ".txt", api_name="/open_dataset")  # the gallery's choices
    watched = (outside, app.dirs.root, app.gradio_dir)
    before = snapshot(*watched)
    try:
        shown = json.dumps(call(client, app, outside))
    except Exception as refused:  # noqa: BLE001 - Gradio's own refusals arrive as errors
        shown = str(refused)
    assert re.search(message, shown), f"{handler}: {shown[:600]}"
    assert not any(secret in shown for secret in SECRETS), shown[:600]
    after = snapshot(*watched)
    new = after.keys() - before.keys()
    if handler == "upload":  # the zip the client uploaded, in Gradio's upload folder
        assert not any(secret.encode() in (after[p] or b"") for p in new for secret in SECRETS)
        new = {p for p in new if not p.startswith(f"{app.gradio_dir}/")}
    assert {p: after[p] for p in after.keys() - (after.keys() - before.keys() - new)} == before


def test_the_allowed_paths_still_work(app, outside):
    client = app.client
    folder, gallery, _, status = client.predict(str(outside / "img"), ".txt",
                                                api_name="/open_dataset")
    assert status.startswith("**Done:**") and len(gallery) == 2
    *_, status, _ = client.predict(folder, "a.png", "new caption", ".tags",
                                   api_name="/save_caption")
    assert "Saved a.tags" in status and (outside / "img" / "a.tags").read_text() == \
        "new caption\n"
    _, status = client.predict(str(outside / "img"), api_name="/use_dataset")
    assert "now trains on" in status
    status = client.predict(str(app.data_adapter), str(outside / "webui"), False,
                            api_name="/copy_adapter")
    assert "Copied to" in status
    assert (outside / "webui" / "adapter.safetensors").read_bytes() == \
        app.data_adapter.read_bytes()


def test_an_adapter_named_outside_the_data_folder_downloads_but_is_not_edited(app, outside):
    source = adapter(outside.parent / "custom-output" / "mine.safetensors")
    before = source.read_bytes()
    status, *_ = app.client.predict(str(source), "t", "w", "d", api_name="/save_metadata")
    assert "is not in the data folder or the output folder of a run" in status
    summary, status, download, *_ = app.client.predict(str(source), api_name="/select_adapter")
    assert "mine.safetensors" in summary and Path(download).read_bytes() == before
    assert source.read_bytes() == before


def fetch(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/gradio_api/file={path}",
                                    timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_gradio_serves_no_file_outside_its_folders(app, outside):
    assert fetch(app.port, str(app.mine / "a.png")) == 200  # the data folder: allowed_paths
    for path in (outside / "secret.txt", f"{app.dirs.root}/../../outside/secret.txt",
                 app.dirs.root / "link-out" / "secret.txt", Path.cwd() / "README.md"):
        (app.dirs.root / "link-out").unlink(missing_ok=True)
        (app.dirs.root / "link-out").symlink_to(outside)
        try:
            assert fetch(app.port, str(path)) == 403, path
        finally:
            (app.dirs.root / "link-out").unlink()


def test_only_the_presets_offered_are_read(app, outside):
    # Gradio's dropdown refuses other values first; the rule holds without it too.
    from gui import presets

    for path in (outside / "preset.toml", app.dirs.presets / ".." / "defaults.toml"):
        with pytest.raises(UserError, match="is not one of the presets offered here"):
            presets.load(str(path), app.dirs)
        with pytest.raises(UserError, match="is not one of the presets offered here"):
            presets.base_path(str(path), app.dirs)
    assert presets.base_path(None, app.dirs) == app.dirs.base_config
    bundled = presets.choices(app.dirs)[0][1]
    assert presets.base_path(bundled, app.dirs) == Path(bundled)


def test_a_saved_preset_name_cannot_leave_the_presets_folder(app, outside):
    before = snapshot(outside)
    status, _ = app.client.predict(f"../../{outside}/evil", *form_values(app.client),
                                   api_name="/save_preset")
    assert "Saved the preset" in status
    written = sorted(p.name for p in app.dirs.presets.iterdir())
    assert [n for n in written if "evil" in n] == [f"{str(outside).strip('/').replace('/', '-')}"
                                                   "-evil.toml"]
    assert snapshot(outside) == before


# --- a scan or check far too long, cancelled from the page -------------------------------
def wait_for(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_slow_scan_blocks_no_other_action_and_stops_on_cancel(app, tmp_path, monkeypatch):
    from datasets_tools import scan

    slow = images(tmp_path / "slow", {f"{i:03d}": "x" for i in range(100)})
    reading = threading.Event()
    real = scan.read_header

    def slow_header(path):
        reading.set()
        time.sleep(0.1)  # 100 images: 10 s, like a huge folder on a slow disk
        return real(path)

    monkeypatch.setattr(scan, "read_header", slow_header)
    client = app.client
    job = client.submit(str(slow), ".txt", api_name="/open_dataset")
    wait_for(reading.is_set)
    *_, status = client.predict(str(app.mine), ".txt", api_name="/open_dataset")
    assert status.startswith("**Done:** Opened") and not job.done()
    started = time.monotonic()
    assert client.predict(api_name="/cancel_scan") == "**Done:** Cancelled 1 running scan or check."
    *_, status = job.result(timeout=10)
    assert time.monotonic() - started < 5
    assert status.startswith(f"**Problem:** Scan of {slow} cancelled after")
    assert client.predict(api_name="/cancel_scan") == \
        "**Done:** Nothing to cancel: no scan or check is running."


def test_a_running_check_is_cancelled_from_the_page(app, tmp_path, monkeypatch):
    from gui import datasets

    pid_file = tmp_path / "pid"
    sleeper = [sys.executable, "-c", "import os, sys, time; open(sys.argv[1], 'w').write("
               "str(os.getpid())); time.sleep(60)", str(pid_file)]
    monkeypatch.setattr(datasets, "python_module", lambda *args: sleeper)
    job = app.client.submit(str(app.mine), ".txt", 64, False, 256, 1024, 64, False,
                            api_name="/check_dataset")
    wait_for(lambda: pid_file.exists() and pid_file.read_text())
    assert "Cancelled 1" in app.client.predict(api_name="/cancel_scan")
    report = job.result(timeout=10)
    assert report == "**Problem:** The dataset check was cancelled; nothing was changed."
    with pytest.raises(ProcessLookupError):  # the child was killed, and reaped
        os.kill(int(pid_file.read_text()), 0)
    shutil.rmtree(tmp_path, ignore_errors=True)
