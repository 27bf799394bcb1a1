"""The page in a real browser (Debian's chromium, driven by Playwright),
against `python app.py` and the real trainer on the demo model: a broken
dataset refused with its report, the demo dataset with one caption edited,
a short training with progress and previews, stop, resume, and the
exported file downloaded. Screenshots of each step: test-output/e2e/."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from tests.gui_browser import (  # noqa: F401 - browser and server are fixtures
    MINUTE,
    Screenshots,
    box,
    browser,
    run_scenario,
    server,
    tab,
)

shot = Screenshots("e2e")


def test_train_the_demo_in_the_browser(browser, server):  # noqa: F811
    run_scenario(browser, server, shot, scenario)


def scenario(page, url: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    page.goto(url)

    # 1. A first visit offers the demo; it fills the Train tab.
    expect(page.locator("#welcome")).to_contain_text("New here?", timeout=MINUTE)
    shot(page, "01-welcome")
    page.click("#load-demo")
    expect(box(page, "cfg-model-path")).to_have_value("demo-shapes", timeout=MINUTE)
    expect(page.locator("#welcome")).to_be_hidden()
    shot(page, "02-demo-settings")

    # 2. A folder of broken images: the report, and Start refuses to start.
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("a.png", "b.jpg"):
        (broken / name).write_bytes(b"not an image")
    tab(page, "Dataset")
    box(page, "ds-folder").fill(str(broken))
    page.click("#ds-open")
    expect(page.locator("#ds-status")).to_contain_text("No usable image", timeout=MINUTE)
    page.click("#ds-check")
    expect(page.locator("#ds-report")).to_contain_text("Not trainable", timeout=MINUTE)
    page.click("#ds-use")
    expect(box(page, "cfg-dataset-path")).to_have_value(str(broken), timeout=MINUTE)
    page.click("#train-start")
    status = page.locator("#train-status")
    expect(status).to_contain_text("cannot be trained on yet; nothing was started",
                                   timeout=MINUTE)
    expect(status).to_contain_text("a.png")
    shot(page, "03-broken-dataset-refused")

    # 3. The demo images, one caption edited.
    tab(page, "Dataset")
    page.click("#ds-demo")
    thumbs = page.locator("#ds-gallery button.thumbnail-item")
    expect(thumbs).to_have_count(9, timeout=MINUTE)
    thumbs.first.click()
    caption = box(page, "ds-caption")
    expect(caption).to_have_value("demoshape, blue circle, plain background", timeout=MINUTE)
    caption.fill("demoshape, blue circle, edited in the browser")
    page.click("#ds-save")
    expect(page.locator("#ds-status")).to_contain_text("Saved 0-circle-blue.txt", timeout=MINUTE)
    folder = tmp_path / "data" / "datasets" / "demo-shapes"
    edited = folder / "4_demoshape" / "0-circle-blue.txt"
    assert edited.read_text() == "demoshape, blue circle, edited in the browser\n"
    shot(page, "04-caption-edited")
    page.click("#ds-use")
    expect(box(page, "cfg-dataset-path")).to_have_value(str(folder), timeout=MINUTE)

    # 4. A short training: progress and a preview appear.
    page.get_by_text("Advanced: every setting").click()  # sample.steps is in there
    for elem_id, value in (("cfg-train-steps", "60"), ("cfg-train-batch_size", "1"),
                           ("cfg-sample-every_n_steps", "2"), ("cfg-sample-steps", "2"),
                           # 2 of the 9 images held out, scored at steps 20, 40, 60
                           ("cfg-dataset-validation_split", "0.2"),
                           ("cfg-train-validate_every_n_steps", "20")):
        box(page, elem_id).fill(value)
    page.click("#train-start")
    expect(status).to_contain_text("Job 1 started", timeout=MINUTE)
    expect(page.locator("#train-progress")).to_contain_text("/ 60", timeout=3 * MINUTE)
    expect(page.locator("#train-previews img").first).to_be_visible(timeout=3 * MINUTE)
    shot(page, "05-training")

    # 5. Stop: the state is saved; Resume finishes the run.
    page.click("#train-stop")
    job = page.locator("#train-job")
    expect(job).to_contain_text("Stopped after step", timeout=3 * MINUTE)
    shot(page, "06-stopped")
    page.click("#train-resume")
    expect(status).to_contain_text("Job 2 resumes", timeout=MINUTE)
    expect(job).to_contain_text("Finished", timeout=5 * MINUTE)
    expect(page.locator("#train-progress")).to_contain_text("Step 60 / 60")
    # The validation loss: a second series in the plot, and its best step named.
    plot = page.locator("#train-loss")
    expect(plot).to_contain_text("Validation best: step", timeout=MINUTE)
    expect(plot.locator(".role-legend-label text")).to_have_text(["train", "validation"])
    expect(plot.locator("g.mark-line.plot_marks path")).to_have_count(2)
    shot(page, "07-finished")
    log = (tmp_path / "data" / "jobs" / "0002" / "log.txt").read_text()
    assert "done: 60 steps" in log

    # 6. Export: the summary, and the file downloads.
    tab(page, "Export")
    page.locator("#export-file input").click()
    page.get_by_role("option", name="demo-learns.safetensors").click()
    expect(page.locator("#export-summary")).to_contain_text("stable-diffusion-v1/lora",
                                                            timeout=2 * MINUTE)
    with page.expect_download() as download:
        page.locator("#export-download a").first.click()
    saved = tmp_path / "downloaded.safetensors"
    download.value.save_as(saved)
    data = saved.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    metadata = json.loads(data[8 : 8 + length])["__metadata__"]
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert metadata["ss_steps"] == "60"
    shot(page, "08-export")
    assert "Traceback" not in page.content()
