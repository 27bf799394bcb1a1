"""Adapter files the runs produced, their summaries, and handing them out:
to the browser, or copied into another app's LoRA folder. Only adapter files
(by their header) leave this way; `gui.paths` has the rules."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from core.atomic import atomic_writer
from core.errors import UserError
from core.run_layout import adapters_under, is_preview
from gui import paths, views
from gui.cli_runs import explain_failure, python_module, run_cli
from gui.datadir import DataDirs
from gui.jobs import JobRunner
from networks.algorithms import ALGORITHMS

# The metadata fields the Export tab edits: (label, ModelSpec key).
EDITABLE = (("Title", "modelspec.title"), ("Trigger words", "modelspec.trigger_phrase"),
            ("Description", "modelspec.description"))
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SUMMARY_KEYS = ("modelspec.architecture", "modelspec.title", "modelspec.trigger_phrase",
                 "modelspec.description", "modelspec.resolution", "ss_sd_model_name",
                 "ss_steps", "ss_network_module", "ss_network_args")


def adapter_files(dirs: DataDirs, runner: JobRunner) -> list[Path]:
    """Every adapter in the app's outputs and in the output folders of its
    jobs, newest first; training states are not adapters."""
    folders = {dirs.outputs} | {Path(job.output_dir) for job in runner.jobs()}
    found: set[Path] = set()
    for folder in folders:
        found.update(adapters_under(folder))
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def any_run(dirs: DataDirs, runner: JobRunner) -> bool:
    """Whether this app has run anything yet: a job, or an adapter in its outputs."""
    return bool(runner.jobs()) or bool(adapters_under(dirs.outputs))


def chosen_after_refresh(found: list[str], current: str | None) -> str | None:
    """The file the Export tab shows after listing `found` (newest first): the
    one the user chose while it is still there, else the newest, else none."""
    return current if current in found else (found[0] if found else None)


def files_found(count: int) -> str:
    return f"{count} adapter file{'s' if count != 1 else ''}."


def label(path: Path) -> str:
    size = path.stat().st_size / 1e6
    return f"{path.name}  ({path.parent.name}, {size:.1f} MB)"


def inspect(path: str) -> dict:
    """`python -m networks inspect FILE --json` (imports torch, so a child)."""
    file = paths.adapter_file(path)
    result = run_cli(python_module("networks", "inspect", str(file), "--json"),
                     "Inspecting the file", timeout=600)
    if result.returncode not in (0, 1):  # 1: it found problems, and lists them
        raise UserError(explain_failure(result.returncode, result.stderr, "Inspecting the file"))
    return json.loads(result.stdout)


def summary(report: dict) -> str:
    def counts(table: dict) -> str:
        return ", ".join(f"{k} ({v})" for k, v in table.items()) or "none"

    lines = [f"**{views.escape(Path(report['path']).name)}**", "",
             f"- Algorithm: {_algorithms(report['algorithms'])}",
             f"- DoRA: {_dora(report.get('dora') or {})}",
             f"- Rank: {counts(report['ranks'])}; alpha: {counts(report['alphas'])}",
             f"- Modules: U-Net {report['unet_modules']}, text encoder "
             f"{report['text_encoder_modules']}; weights {counts(report['dtypes'])}"]
    meta = report["metadata"]
    lines += [f"- `{key}`: {views.escape(_short(meta[key]))}" for key in _SUMMARY_KEYS
              if meta.get(key)]
    lines += [f"- **Problem:** {views.escape(p)}" for p in report["problems"]]
    lines += [f"- Warning: {views.escape(w)}" for w in report["warnings"]]
    if not report["problems"]:
        lines.append("- Loads in A1111, ComfyUI and lycoris.")
    return "\n".join(lines)


def _algorithms(found: dict[str, int]) -> str:
    """`LoKr (lokr, 96 modules)`: the registry's label, without its explanation
    in parentheses, and the name the config uses."""
    names = [f"{ALGORITHMS[name].label.split(' (')[0] if name in ALGORITHMS else name} "
             f"({name}, {n} modules)" for name, n in found.items()]
    return ", ".join(names) or "none"


def _dora(axes: dict[str, int]) -> str:
    """Whether the modules learn a magnitude (`dora_scale`), and along which axis:
    `inspect` counts them by "input" / "output" channels."""
    if not axes:
        return "no"
    loads = {"input": "as A1111 and ComfyUI apply it; lycoris with wd_on_output=False",
             "output": "lycoris wd_on_output; A1111 and ComfyUI do not apply it as trained"}
    return "yes, " + "; ".join(
        f"magnitude per {axis} channel ({n} modules, {loads.get(axis, 'unknown axis')})"
        for axis, n in axes.items())


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def download(path: str, dirs: DataDirs) -> Path:
    """The adapter `path` as a file the browser may fetch."""
    return servable(paths.adapter_file(path), dirs)


def servable(path: Path, dirs: DataDirs) -> Path:
    """A file the app made, as a path the browser may fetch: an adapter, or a
    preview image of a run. Gradio serves a returned file when it is in the
    data folder (`allowed_paths`), the working folder or the temp folder (it
    copies it into its upload folder); a file elsewhere, e.g. in a custom
    output.dir, is copied next to the data first. Nothing else is ever
    returned, so no request can make Gradio serve another file."""
    resolved = path.resolve()
    if not _is_preview(resolved):
        resolved = paths.adapter_file(str(resolved), "only adapter files and previews are served")
    allowed = (dirs.root.resolve(), Path.cwd().resolve(), Path(tempfile.gettempdir()).resolve())
    if any(resolved.is_relative_to(folder) for folder in allowed):
        return resolved
    stat = resolved.stat()
    key = hashlib.sha1(f"{resolved}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    copy = dirs.root / "served" / key[:16] / resolved.name
    if not copy.exists():
        copy.parent.mkdir(parents=True, exist_ok=True)
        tmp = copy.with_name(copy.name + ".tmp")
        shutil.copyfile(resolved, tmp)
        os.replace(tmp, copy)
    return copy


def _is_preview(path: Path) -> bool:
    """A PNG named and placed as a run's preview (core/run_layout.py)."""
    if not is_preview(path) or not path.is_file():
        return False
    with open(path, "rb") as file:
        return file.read(8) == _PNG_SIGNATURE


def copy_to_folder(path: str | os.PathLike, folder: str, overwrite: bool) -> Path:
    """Copy an adapter into e.g. A1111's or ComfyUI's models/Lora, atomically."""
    source = paths.adapter_file(path)
    target = paths.copy_target(source, folder, overwrite)
    with atomic_writer(target) as out, open(source, "rb") as data:
        shutil.copyfileobj(data, out, 1 << 20)
    return target
