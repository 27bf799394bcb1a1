"""The Tools tab in a real browser (the fixtures of tests/gui_browser.py),
against `python app.py` and the real `python -m networks resize`: a rank-8
adapter of the demo model, written where the Export tab looks, is resized to
rank 4 from the Tools tab; the progress bar ends full, and the Export tab
then lists the new file and its summary says rank 4. A refused form shows
one paragraph first. Screenshots: test-output/e2e-tools/. And the page's
API (gradio_client) with the fake tool of tests/test_gui_tools.py: progress
streamed while the tool runs, Cancel answered during a run, an imported
preset loaded into the Train tab's form."""

from __future__ import annotations

import functools
import re
from pathlib import Path

from gui.form import KEYS
from gui.jobs import JobRunner
from networks.export import export_network
from networks.metadata import ExportInfo
from networks.network import AdapterNetwork, NetworkSpec
from tests.gui_browser import (  # noqa: F401 - browser and server are fixtures
    MINUTE,
    Screenshots,
    box,
    browser,
    run_scenario,
    server,
    tab,
)
from tests.sd_fixtures import randomize
from tests.test_gui_tools import adapter, dirs, fake  # noqa: F401 - fixtures
from trainer.demo_assets import ensure_demo_model
from trainer.model_loading import load_sd_model

shot = Screenshots("e2e-tools")


def write_trained_adapter(path: Path) -> int:
    """A rank-8 LoRA of the demo model with non-zero weights, as a run exports
    it; its number of modules."""
    sd = load_sd_model(ensure_demo_model())  # the shared cache's copy: no generating
    network = AdapterNetwork.create(NetworkSpec(rank=8, alpha=4.0), sd.unet, sd.text_encoder)
    randomize(network, seed=3)
    path.parent.mkdir(parents=True, exist_ok=True)
    export_network(network, path, ExportInfo(title="demo-run", output_name="demo-run"))
    return len(network.adapters)


def test_resize_in_the_tools_tab_then_export_lists_it(browser, server):  # noqa: F811
    modules = write_trained_adapter(server[1] / "data" / "outputs" / "demo-run" /
                                    "demo-run.safetensors")
    run_scenario(browser, server, shot, functools.partial(scenario, modules=modules))


def pick(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option).first.click()


def scenario(page, url: str, tmp_path: Path, modules: int) -> None:
    from playwright.sync_api import expect

    page.goto(url)
    tab(page, "Tools")
    status, bar = page.locator("#tools-status"), page.locator("#tools-progress")
    # Refused before anything runs: one paragraph, and the tool never started.
    page.click("#tools-run")
    expect(status).to_contain_text("Problem: Resize: pick an adapter from the list",
                                   timeout=MINUTE)
    shot(page, "1-refused")

    pick(page, "tools-resize-file", "demo-run.safetensors")
    box(page, "tools-resize-rank").fill("4")
    box(page, "tools-resize-name").fill("demo-run-r4")
    page.click("#tools-run")
    expect(status).to_contain_text("Resizing wrote", timeout=2 * MINUTE)
    written = tmp_path / "data" / "outputs" / "tools" / "demo-run-r4.safetensors"
    expect(status).to_contain_text(f"{written}")
    expect(status).to_contain_text("The Export tab lists it as demo-run-r4.safetensors (tools)")
    # The bar was fed by the tool's own lines: one per module of the file.
    expect(bar.locator("progress")).to_have_attribute("max", str(modules))
    expect(bar.locator("progress")).to_have_attribute("value", str(modules))
    expect(page.locator("#tools-result")).to_contain_text(re.compile(r"8 -> 4 "))  # the report
    shot(page, "2-resized")
    assert written.is_file()

    tab(page, "Export")
    pick(page, "export-file", "demo-run-r4.safetensors")
    summary = page.locator("#export-summary")
    expect(summary).to_contain_text("demo-run-r4.safetensors", timeout=2 * MINUTE)
    expect(summary).to_contain_text("Rank: 4 (")
    expect(summary).not_to_contain_text("Rank: 8")
    shot(page, "3-export")
    assert "Traceback" not in page.content()


def test_the_page_streams_the_progress_while_the_tool_runs(dirs, adapter, fake,  # noqa: F811
                                                           tmp_path, monkeypatch):
    """Through the served page: the fake tool waits after its first progress
    line until this test has seen that line come out of the page."""
    from tests.test_gui_app import served

    go = tmp_path / "go"
    monkeypatch.setenv("FAKE_TOOL_GO", str(go))
    with served(dirs, JobRunner(dirs.jobs)) as (client, _):
        params = client.view_api(print_info=False, return_format="dict")[
            "named_endpoints"]["/run_tool"]["parameters"]
        values = [p["parameter_default"] if p["parameter_has_default"] else None for p in params]
        labels = [p["label"] for p in params]
        for label, value in (("Adapter to resize", str(adapter)), ("Output name", "streamed")):
            values[labels.index(label)] = value  # the first "Output name" is Resize's
        job = client.submit(*values, api_name="/run_tool")
        bars = []
        for output in job:
            bars.append(str(output[1]))
            if "1/3 layer_1" in bars[-1]:
                go.touch()
        final = job.outputs()[-1]
        # Cancel is answered while a run streams (it is not queued behind it).
        monkeypatch.setenv("FAKE_TOOL_MODE", "hang")
        values[labels.index("Output name")] = "hung"
        hung = client.submit(*values, api_name="/run_tool")
        for output in hung:
            if "1/3 layer_1" in str(output[1]):
                assert client.predict(api_name="/cancel_tool") == "**Done:** Cancelling..."
        assert hung.outputs()[-1][0] == ("**Problem:** Resizing was cancelled; nothing was "
                                         "written.")
        assert client.predict(api_name="/cancel_tool") == "Nothing is running."
        # An imported preset fills the Train tab's form (the same page session).
        monkeypatch.setenv("FAKE_TOOL_MODE", "ok")
        kohya = tmp_path / "kohya_ss.json"
        kohya.write_text("{}")
        values[0] = "import-kohya"
        values[labels.index("kohya config: kohya_ss GUI .json or sd-scripts .toml")] = str(kohya)
        imported = client.predict(*values, api_name="/run_tool")
        assert "wrote " + str(dirs.presets / "kohya_ss.toml") in imported[0]
        form = client.predict("/typed/model.safetensors", "/typed/images",
                              api_name="/load_imported_preset")
        assert form[KEYS.index("network.rank")] == 12
        assert form[KEYS.index("model.path")] == "/typed/model.safetensors"
        assert "Loaded the preset kohya_ss into the Train tab." in form[-1]
    assert not (dirs.outputs / "tools" / "hung.safetensors").exists()
    assert any('value="1" max="3"' in bar for bar in bars)  # shown before the tool went on
    assert "**Done:** Resizing wrote" in final[0] and "3/3 done" in final[1]
    assert (dirs.outputs / "tools" / "streamed.safetensors").is_file()
    # The tab's adapter lists now offer the new file first (for the next tool).
    assert final[3]["choices"][0] == ["streamed.safetensors  (tools, 0.0 MB)",
                                      str(dirs.outputs / "tools" / "streamed.safetensors")]
