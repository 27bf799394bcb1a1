"""Markdown for the page: problems, the dataset report, job progress.

Every failure the page shows goes through `problem`, so messages look the
same everywhere and file names cannot break the Markdown.
"""

from __future__ import annotations

import re
from collections import Counter

from gui.run_files import Metric, format_seconds

# What would format text or break a table; '_' inside a word never does
# (GitHub-flavoured Markdown), so file and setting names stay readable.
_MARKDOWN_SPECIAL = re.compile(r"[\\`*<>|\[\]~]|(?<!\w)_|_(?!\w)")


def escape(text: str) -> str:
    return _MARKDOWN_SPECIAL.sub(lambda match: "\\" + match.group(0), text)


def problem(message: str) -> str:
    """A failure: a short first line, the rest (e.g. a report) as a block."""
    first, _, rest = message.strip().partition("\n")
    text = f"**Problem:** {escape(first)}"
    if rest.strip():
        text += "\n\n```text\n" + rest.replace("```", "'''") + "\n```"
    return text


def ok(message: str) -> str:
    return f"**Done:** {escape(message)}"


def check_report(report: dict, tags: Counter[str], top: int = 30) -> str:
    """`datasets_tools check --json`, readable: verdict, problems, skipped files,
    buckets, tags."""
    listed = [p for p in report["problems"] if p["severity"] != "skipped"]
    skipped = [p for p in report["problems"] if p["severity"] == "skipped"]
    lines = [_verdict(report, len(skipped))]
    if listed:
        lines += ["", "| severity | file | problem |", "|---|---|---|"]
        lines += [f"| {p['severity']} | {_cell(p['path'])} | {_cell(p['reason'])} |"
                  for p in listed]
    if skipped:
        lines += ["", f"**{_plural(len(skipped), 'file')} skipped** (not trained on)", "",
                  "| file | why |", "|---|---|"]
        lines += [f"| {_cell(p['path'])} | {_cell(p['reason'])} |" for p in skipped]
    buckets = (report.get("buckets") or {}).get("buckets") or []
    if buckets and report["images"]:
        lines += ["", f"**Buckets** (resolution {report['resolution']})", "",
                  "| size | images | samples |", "|---|---|---|"]
        lines += [f"| {b['width']}x{b['height']} | {b['images']} | {b['samples']} |"
                  for b in buckets]
    if tags:
        lines += ["", f"**Tag frequency** (top {min(top, len(tags))} of {len(tags)})", "",
                  "| tag | images |", "|---|---|"]
        lines += [f"| {_cell(tag)} | {count} |" for tag, count in tags.most_common(top)]
    return "\n".join(lines)


def _verdict(report: dict, n_skipped: int) -> str:
    n_err, warnings = report["errors"], _plural(report["warnings"], "warning")
    if report["trainable"]:
        skips = f", {_plural(n_skipped, 'file')} skipped" if n_skipped else ""
        return (f"### Trainable: {report['images']} images, {report['samples_per_epoch']} "
                f"samples per epoch (with repeats){skips}, {warnings}")
    if not n_err:  # only dataset.strict refuses a report without errors
        return (f"### Not trainable with dataset.strict = true: {_plural(n_skipped, 'file')} "
                "would be skipped\n\nFix or remove them, or turn dataset.strict off to train "
                "on the rest.")
    return (f"### Not trainable: {_plural(n_err, 'error')}, {warnings}\n\n"
            "Fix the errors below (replace or remove those files), then check again.")


def _plural(n: int, what: str) -> str:
    return f"{n} {what}{'s' if n != 1 else ''}"


def _cell(text: str) -> str:
    return escape(text).replace("\n", " ")


def progress(step: int, total: int | None, last: Metric | None) -> str:
    if last is None:
        return "Starting: loading the model and preparing the images..."
    parts = [f"**Step {step}" + (f" / {total}**" if total else "**")]
    if total:
        parts.append(f"{100 * step / total:.0f}%")
    parts.append(f"loss {last.loss:.4f}")
    parts.append(f"{last.it_s:.2f} it/s" if last.it_s >= 1 else f"{1 / last.it_s:.1f} s/it"
                 if last.it_s > 0 else "")
    if total and step < total:
        parts.append(f"ETA {format_seconds(last.eta_s)}")
    parts.append(f"epoch {last.epoch}")
    return " · ".join(p for p in parts if p)
