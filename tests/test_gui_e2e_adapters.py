"""Issue #13 in a real browser (the fixtures of test_gui_e2e.py): pick LoRA
and tick DoRA, train on the demo, export, and the Export tab's summary says
LoRA and DoRA; then the same with LoKr picked in the Adapter dropdown, whose
summary says LoKr and no DoRA. Screenshots: test-output/e2e-adapters/."""

from __future__ import annotations

from pathlib import Path

from gui.exports import summary
from networks.algorithms import ALGORITHMS
from tests.gui_browser import (  # noqa: F401 - browser and server are fixtures
    MINUTE,
    Screenshots,
    box,
    browser,
    run_scenario,
    server,
    tab,
)

shot = Screenshots("e2e-adapters")


def test_summary_says_the_algorithm_and_dora():
    """The summary lines the browser test reads, from `inspect --json` reports."""
    report = {"path": "/runs/a.safetensors", "algorithms": {"lora": 12}, "ranks": {"4": 12},
              "alphas": {"4": 12}, "dora": {"input": 12}, "unet_modules": 12,
              "text_encoder_modules": 0, "dtypes": {"float32": 36}, "metadata": {},
              "problems": [], "warnings": []}
    text = summary(report)
    assert "- Algorithm: LoRA (lora, 12 modules)" in text
    assert "- DoRA: yes, magnitude per input channel (12 modules," in text
    on_output = summary({**report, "algorithms": {"loha": 3}, "dora": {"output": 3}})
    assert "- Algorithm: LoHa (loha, 3 modules)" in on_output
    assert "magnitude per output channel (3 modules, lycoris wd_on_output" in on_output
    plain = summary({**report, "algorithms": {"lokr": 5, "someday": 1}, "dora": {}})
    assert "- Algorithm: LoKr (lokr, 5 modules), someday (someday, 1 modules)" in plain
    assert "- DoRA: no" in plain
    assert "- DoRA: no" in summary({k: v for k, v in report.items() if k != "dora"})


def test_lora_with_dora_and_lokr_in_the_browser(browser, server):  # noqa: F811
    run_scenario(browser, server, shot, scenario)


def pick_kind(page, label: str) -> None:
    """Choose the Adapter dropdown's option labelled exactly `label`."""
    page.locator("#train-kind input").click()
    page.get_by_role("option", name=label, exact=True).click()


def train(page, job: int, name: str, kind: str, dora: bool) -> None:
    """Pick the adapter kind, set DoRA, a 4-step run without previews, Start,
    and wait until the job has finished."""
    from playwright.sync_api import expect

    tab(page, "Train")
    pick_kind(page, ALGORITHMS[kind].label)
    expect(box(page, "cfg-network-type")).to_have_value(kind, timeout=MINUTE)
    dora_box = page.locator("#cfg-network-dora input[type=checkbox]")
    dora_box.set_checked(dora)
    expect(dora_box).to_be_checked(checked=dora)
    for elem_id, value in (("cfg-train-steps", "4"), ("cfg-train-batch_size", "1"),
                           ("cfg-sample-every_n_steps", "0"), ("cfg-output-name", name)):
        box(page, elem_id).fill(value)
    page.click("#train-start")
    expect(page.locator("#train-status")).to_contain_text(f"Job {job} started", timeout=MINUTE)
    expect(page.locator("#train-job")).to_contain_text(f"Job {job} ({name}): Finished",
                                                       timeout=3 * MINUTE)
    shot(page, f"{job}-{name}-finished")


def exported_summary(page, name: str):
    """The Export tab's summary of the run's final file (its periodic files,
    if any, are named `{name}-stepNNNNNN`)."""
    from playwright.sync_api import expect

    tab(page, "Export")
    page.locator("#export-file input").click()
    page.get_by_role("option", name=f"{name}.safetensors").click()
    summary_md = page.locator("#export-summary")
    expect(summary_md).to_contain_text(f"{name}.safetensors", timeout=2 * MINUTE)
    return summary_md


def scenario(page, url: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    page.goto(url)
    expect(page.locator("#welcome")).to_contain_text("New here?", timeout=MINUTE)
    page.click("#load-demo")
    expect(box(page, "cfg-model-path")).to_have_value("demo-shapes", timeout=MINUTE)
    page.get_by_text("Advanced: every setting").click()  # network.dora is in there

    # LoRA with DoRA: the summary says both, and the file has the DoRA args.
    train(page, 1, "e2e-dora", "lora", dora=True)
    text = exported_summary(page, "e2e-dora")
    expect(text).to_contain_text("Algorithm: LoRA (lora, ")
    expect(text).to_contain_text("DoRA: yes, magnitude per input channel")
    expect(text).to_contain_text("dora_wd")
    shot(page, "1-e2e-dora-export")

    # LoKr, DoRA unticked: the summary says LoKr and no DoRA.
    train(page, 2, "e2e-lokr", "lokr", dora=False)
    text = exported_summary(page, "e2e-lokr")
    expect(text).to_contain_text("Algorithm: LoKr (lokr, ")
    expect(text).to_contain_text("DoRA: no")
    expect(text).not_to_contain_text("lora (")
    shot(page, "2-e2e-lokr-export")
    for name in ("e2e-dora", "e2e-lokr"):
        assert (tmp_path / "data" / "outputs" / name / f"{name}.safetensors").is_file()
    assert "Traceback" not in page.content()
