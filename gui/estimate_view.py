"""The Train tab's memory estimate: `python -m trainer estimate --json` run as a
child (the page never imports torch) on the form's settings, shown as a table
with the advice; a failed or slow child becomes one clear line."""

from __future__ import annotations

import json
from pathlib import Path

from gui import views
from gui.cli_runs import explain_failure, python_module, run_cli

WHAT = "The memory estimate"
# Importing torch and diffusers takes most of it: about 15 s on a busy 2-core CPU.
TIMEOUT_S = 120.0


def estimate_command(base: Path, overrides: list[str]) -> list[str]:
    sets = [arg for override in overrides for arg in ("--set", override)]
    return python_module("trainer", "estimate", str(base), *sets, "--json")


def run_estimate(base: Path, overrides: list[str], timeout: float = TIMEOUT_S) -> str:
    """Markdown: the estimate of the run `base` + `overrides` describes, or why there is none."""
    result = run_cli(estimate_command(base, overrides), WHAT, timeout=timeout)
    if result.returncode != 0:
        reason = explain_failure(result.returncode, result.stderr, WHAT)
        return views.problem(f"No memory estimate: {reason}")
    try:
        report = json.loads(result.stdout)
    except ValueError:
        return views.problem(f"No memory estimate: {WHAT} printed no report; see the console.")
    return estimate_markdown(report)


def _size(n: int | None) -> str:
    if n is None:
        return "unknown"
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{-(-n // 1024)} KiB"


def estimate_markdown(report: dict) -> str:
    verdict = {True: "fits", False: "does **not** fit", None: "cannot be compared"}[report["fits"]]
    lines = [f"**Memory estimate** on {report['device']} ({views.escape(report['source'])}): "
             f"{_size(report['total_bytes'])} of {_size(report['available_bytes'])} available, "
             f"{verdict}.", "", "| part | memory |", "|---|---|"]
    for part in report["parts"]:
        note = "" if part["counted"] else f" (not added: {views.escape(part['note'])})"
        lines.append(f"| {views.escape(part['name'])}{note} | {_size(part['bytes'])} |")
    lines.append(f"| **the run, at its peak** | **{_size(report['run_bytes'])}** |")
    if report["process_bytes"]:
        lines.append(f"| the process itself (Python, torch, libraries) | "
                     f"{_size(report['process_bytes'])} |")
    lines.append(f"| **total** | **{_size(report['total_bytes'])}** |")
    if report["advice"]:
        lines += ["", views.escape(report["advice"])]
    lines += [f"- {views.escape(note)}" for note in report.get("notes", [])]
    return "\n".join(lines)
