"""What the browser tests share: `python app.py` on a free port with its own
data folder (`server`), Debian's chromium under Playwright (`browser`), and
`run_scenario`, which leaves a screenshot and the jobs' logs when a step fails.
Test modules import the fixtures by name."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
MINUTE = 60_000  # Playwright timeouts are in milliseconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    port = free_port()
    env = {**os.environ, "LORA_TRAINER_CACHE": str(tmp_path / "cache")}
    log = open(tmp_path / "app.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [sys.executable, "app.py", "--port", str(port), "--data-dir", str(tmp_path / "data")],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                log.close()
                pytest.fail("app.py did not serve:\n" + (tmp_path / "app.log").read_text())
            time.sleep(0.2)
    yield url, tmp_path
    process.terminate()  # SIGTERM: the app stops a running job cleanly, then exits
    process.wait(timeout=120)
    log.close()


@pytest.fixture
def browser():
    if not CHROMIUM.exists():
        pytest.fail("Chromium is not installed: run `apt-get install -y chromium` (Debian's "
                    "package; Playwright's own browser download does not work here).")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        yield launched
        launched.close()


def box(page, elem_id: str):
    """The text or number input inside a Gradio component."""
    return page.locator(f"#{elem_id}").locator("textarea, input").first


def tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


class Screenshots:
    """One folder of screenshots per browser test, emptied when the test starts."""

    def __init__(self, name: str):
        self.folder = REPO / "test-output" / name

    def clear(self) -> None:
        if self.folder.exists():
            shutil.rmtree(self.folder)

    def __call__(self, page, name: str) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        return path


def run_scenario(browser, server, shots: Screenshots, scenario: Callable) -> None:
    """`scenario(page, url, tmp_path)` in a fresh page; a failed assertion
    gains the failure's screenshot and the tail of every job's log."""
    url, tmp_path = server
    shots.clear()
    page = browser.new_page(viewport={"width": 1280, "height": 1600})
    try:
        scenario(page, url, tmp_path)
    except AssertionError as failure:
        picture = shots(page, "failure")
        logs = "\n".join(f"--- {log}\n{log.read_text()[-2000:]}"
                         for log in sorted((tmp_path / "data" / "jobs").glob("*/log.txt")))
        raise AssertionError(f"{failure}\nscreenshot: {picture}\n{logs}") from None
