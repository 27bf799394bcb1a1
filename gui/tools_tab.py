"""The Tools tab: resize, merge, convert and extract adapters, merge them
into a model, import a kohya config. One tool runs at a time (a second Run
waits in Gradio's queue); its progress bar is fed by the child's `progress:`
lines. gui/tools.py builds the command line, gui/tool_runs.py runs it."""

from __future__ import annotations

import html
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from core.errors import UserError
from gui import exports, presets, tool_runs, tools, views
from gui.cli_runs import CliResult
from gui.form import KEYS, config_to_values
from gui.handlers import Cancels, Context

INTRO = ("Each tool writes a new file and never changes its inputs. Adapters go to "
         "`outputs/tools/` and appear in the **Export** tab; merged models go to `models/`, "
         "imported presets to the Train tab's presets.")
PRECISION_CHOICES = [("the tool's default", ""), *((p, p) for p in tools.PRECISIONS)]
METHODS = [("Fixed rank", "rank"), ("sv_ratio: largest / smallest kept singular value", "sv_ratio"),
           ("sv_fro: share of the Frobenius norm kept", "sv_fro"),
           ("sv_cumulative: share of the singular values' sum kept", "sv_cumulative")]


def progress_html(progress: tool_runs.Progress | None, note: str = "") -> str:
    """The bar: the last progress line the tool printed, as a <progress> element."""
    if progress is None:  # no value: the browser shows a bar that moves without a number
        return _bar("", note or "Starting: loading the files...")
    done, total, what = progress
    return _bar(f'value="{done}" max="{max(total, 1)}"',
                f"{done}/{total}" + (f" {what}" if what else ""))


def _bar(attributes: str, label: str) -> str:
    return (f'<div id="tools-bar"><progress {attributes} style="width: 60%"></progress> '
            f"<span>{html.escape(label)}</span></div>")


IDLE = '<div id="tools-bar"><span>No tool is running.</span></div>'


def adapter_choices(ctx: Context) -> list[tuple[str, str]]:
    return [(exports.label(p), str(p)) for p in exports.adapter_files(ctx.dirs, ctx.runner)]


def _file_box(label: str, elem_id: str, choices: list, info: str, adapters: list) -> gr.Dropdown:
    """A dropdown of the app's adapters that also takes a typed path, with an
    upload button that puts the uploaded file's path into it."""
    with gr.Row():
        box = gr.Dropdown(label=label, choices=choices, value=None, allow_custom_value=True,
                          scale=5, elem_id=elem_id, info=info)
        upload = gr.UploadButton("Upload", scale=1, type="filepath", elem_id=f"{elem_id}-upload")
    upload.upload(lambda path: path, upload, box, api_visibility="private")
    adapters.append(box)
    return box


def _lines_box(label: str, elem_id: str, choices: list, adapters: list) -> gr.Textbox:
    """FILE:WEIGHT lines, with a list and an upload button that add a line."""
    with gr.Row():
        box = gr.Textbox(label=label, lines=3, scale=4, elem_id=elem_id,
                         info="One per line: FILE or FILE:WEIGHT (1.0 when left out).")
        add = gr.Dropdown(label="Add an adapter", choices=choices, value=None, scale=2,
                          elem_id=f"{elem_id}-add")
        upload = gr.UploadButton("Upload", scale=1, type="filepath", elem_id=f"{elem_id}-upload")

    def added(current: str, path: str | None) -> str:
        if not path:
            return current
        return (current.rstrip() + "\n" if current.strip() else "") + f"{path}:1.0"

    add.input(added, [box, add], box, api_visibility="private")
    upload.upload(added, [box, upload], box, api_visibility="private")
    adapters.append(add)
    return box


def _precision(elem_id: str) -> gr.Dropdown:
    return gr.Dropdown(label="Precision of the result", choices=PRECISION_CHOICES, value="",
                       elem_id=elem_id)


def _name(elem_id: str, placeholder: str) -> gr.Textbox:
    return gr.Textbox(label="Output name", elem_id=elem_id, placeholder=placeholder,
                      info="Letters, digits, '-', '_'; empty: the placeholder's name.")


def _resize(choices: list, adapters: list) -> dict:
    file = _file_box("Adapter to resize", "tools-resize-file", choices,
                     "From your runs and tools, newest first; or upload one or type a path.",
                     adapters)
    with gr.Row():
        method = gr.Dropdown(label="Method", choices=METHODS, value="rank",
                             elem_id="tools-resize-method",
                             info="A fixed rank, or a rank per module from its singular values.")
        rank = gr.Number(label="Rank (largest rank with a dynamic method)", value=8,
                         precision=0, elem_id="tools-resize-rank")
        value = gr.Textbox(label="Dynamic value", elem_id="tools-resize-value",
                           placeholder="e.g. 4 (sv_ratio) or 0.9 (sv_fro, sv_cumulative)")
    with gr.Row():
        conv = gr.Textbox(label="Conv rank (optional)", elem_id="tools-resize-conv",
                          placeholder="empty: as the rank", info="For 3x3 conv (LoCon) modules.")
        precision = _precision("tools-resize-precision")
        name = _name("tools-resize-name", "<adapter>-r<rank>")
    return {"file": file, "method": method, "rank": rank, "value": value, "conv_rank": conv,
            "precision": precision, "name": name}


def _merge(choices: list, adapters: list) -> dict:
    files = _lines_box("Adapters to merge (two or more)", "tools-merge-files", choices, adapters)
    with gr.Row():
        rank = gr.Textbox(label="Rank of the result (optional)", elem_id="tools-merge-rank",
                          placeholder="empty: exact, the ranks side by side",
                          info="Needed when LoHa/LoKr files share modules (SVD to this rank).")
        conv = gr.Textbox(label="Conv rank (optional, with a rank)", elem_id="tools-merge-conv",
                          placeholder="empty: as the rank")
        precision = _precision("tools-merge-precision")
        name = _name("tools-merge-name", "<first adapter>-merged")
    return {"files": files, "rank": rank, "conv_rank": conv, "precision": precision,
            "name": name}


def _convert(choices: list, adapters: list) -> dict:
    file = _file_box("File or folder to convert", "tools-convert-file", choices,
                     "A diffusers/PEFT LoRA (file or folder) or another app's adapter.", adapters)
    with gr.Row():
        drop = gr.Checkbox(label="Leave out keys that map to no layer (listed in the report)",
                           value=False, elem_id="tools-convert-drop")
        precision = _precision("tools-convert-precision")
        name = _name("tools-convert-name", "<input>-kohya")
    return {"file": file, "drop_unknown": drop, "precision": precision, "name": name}


def _merge_into(choices: list, adapters: list) -> dict:
    model = gr.Textbox(label="Base model", elem_id="tools-mi-model",
                       info="An SD 1.x .safetensors checkpoint or a diffusers folder.")
    files = _lines_box("Adapters to merge into it", "tools-mi-files", choices, adapters)
    with gr.Row():
        precision = _precision("tools-mi-precision")
        diffusers = gr.Checkbox(label="Write a diffusers folder instead of one .safetensors",
                                value=False, elem_id="tools-mi-diffusers")
        name = _name("tools-mi-name", "<model>-<first adapter>")
    return {"model": model, "files": files, "precision": precision, "diffusers": diffusers,
            "name": name}


def _extract(choices: list, adapters: list) -> dict:
    with gr.Row():
        base = gr.Textbox(label="Base model", elem_id="tools-extract-base",
                          info="The model the fine-tune started from: .safetensors or diffusers.")
        tuned = gr.Textbox(label="Fine-tuned model", elem_id="tools-extract-tuned",
                           info="The fine-tuned model, in either layout.")
    with gr.Row():
        rank = gr.Number(label="Rank", value=16, precision=0, elem_id="tools-extract-rank")
        conv = gr.Textbox(label="Conv rank (optional)", elem_id="tools-extract-conv",
                          placeholder="empty: no 3x3 convs (a LoRA, not a LoCon)")
        precision = _precision("tools-extract-precision")
        name = _name("tools-extract-name", "<tuned>-extracted-r<rank>")
    return {"base": base, "tuned": tuned, "rank": rank, "conv_rank": conv,
            "precision": precision, "name": name}


def _import(choices: list, adapters: list) -> dict:
    with gr.Row():
        file = gr.Textbox(label="kohya config: kohya_ss GUI .json or sd-scripts .toml", scale=5,
                          elem_id="tools-import-file")
        upload = gr.UploadButton("Upload", scale=1, type="filepath",
                                 elem_id="tools-import-upload")
    upload.upload(lambda path: path, upload, file, api_visibility="private")
    with gr.Row():
        dataset = gr.Textbox(label="sd-scripts dataset config (optional)", scale=5,
                             elem_id="tools-import-dataset",
                             info="The [[datasets]] TOML given to sd-scripts' --dataset_config.")
        dataset_upload = gr.UploadButton("Upload", scale=1, type="filepath",
                                         elem_id="tools-import-dataset-upload")
    dataset_upload.upload(lambda path: path, dataset_upload, dataset, api_visibility="private")
    name = _name("tools-import-name", "<config file name>")
    return {"file": file, "dataset_config": dataset, "name": name}


FIELDS = {"resize": _resize, "merge": _merge, "convert": _convert, "merge-into": _merge_into,
          "extract": _extract, "import-kohya": _import}


@dataclass(frozen=True)
class Shown:
    """One update of the tab while a tool runs; None leaves a box as it is."""

    status: str | None = None
    bar: str | None = None
    result: str | None = None  # the report
    wrote: tool_runs.Done | None = None


def run_updates(ctx: Context, cancels: Cancels, tool: str, values: dict):
    """The tab's updates for one run of `tool`: refused before it starts,
    progress while it runs, then what it wrote or why it failed."""
    try:
        planned = tools.plan(tool, values, ctx.dirs)
        ctx.runner.check_free(planned.out.parent)  # a run named "tools" trains there
        tool_runs.prepare(planned)
    except (UserError, OSError) as error:
        yield Shown(_failure(error), IDLE, "")
        return
    busy = ctx.runner.current()
    note = (f" Training job {busy.id} is running too: the tool shares the CPU and memory with "
            "it, so both run slower." if busy else "")
    yield Shown(f"**{planned.what}:** `{_command_line(planned.command)}`{views.escape(note)}",
                progress_html(None), "")
    started, result, total = time.perf_counter(), None, 1
    try:
        with cancels.running() as cancel:
            for event in tool_runs.follow(planned.command, planned.what, cancel):
                if isinstance(event, CliResult):
                    result = event
                elif event is not None:
                    total = event[1]
                    yield Shown(bar=progress_html(event))
        done = tool_runs.outcome(planned, result)
    except Exception as error:  # noqa: BLE001 - the page shows a paragraph, never a traceback
        yield Shown(_failure(error), IDLE)
        return
    yield Shown(views.ok(tool_runs.describe(planned, done, time.perf_counter() - started)),
                progress_html((total, total, "done")), done.report, done)


def _command_line(command: list[str]) -> str:
    """What to type to run the same in a terminal (in the repository)."""
    import shlex

    return shlex.join(["python", *command[1:]]).replace("`", "'")


def _failure(error: Exception) -> str:
    if isinstance(error, UserError):
        return views.problem(str(error))
    if isinstance(error, OSError):
        where = f" ({error.filename})" if error.filename else ""
        return views.problem(f"{error.strerror or error}{where}.")
    traceback.print_exc()
    return views.problem(f"Unexpected {type(error).__name__}: {error}. This is a bug in the app; "
                         "the console where it runs has the details.")


def build(ctx: Context, tab) -> None:
    cancels, adapters, choices = Cancels(), [], adapter_choices(ctx)
    gr.Markdown(INTRO)
    tool = gr.Radio(label="Tool", choices=[(label, key) for key, (label, _) in tools.TOOLS.items()],
                    value="resize", elem_id="tools-tool")
    columns, fields = {}, {}
    for key, make in FIELDS.items():
        with gr.Column(visible=key == "resize", elem_id=f"tools-{key}") as columns[key]:
            fields[key] = make(choices, adapters)
    with gr.Row():
        overwrite = gr.Checkbox(label="Overwrite an existing output of that name", value=False,
                                elem_id="tools-overwrite")
        run = gr.Button("Run", variant="primary", elem_id="tools-run")
        cancel = gr.Button("Cancel", variant="stop", elem_id="tools-cancel")
    out = Outputs(status=gr.Markdown(elem_id="tools-status"),
                  bar=gr.HTML(IDLE, elem_id="tools-progress"),
                  result=gr.Code(label="Report", language=None, lines=3, max_lines=16,
                                 interactive=False, visible=False, elem_id="tools-result"),
                  imported=gr.State(""),
                  load=gr.Button("Load the imported preset into the Train tab", visible=False,
                                 elem_id="tools-load-preset"), adapters=adapters)
    order = [(key, name) for key in FIELDS for name in fields[key]]

    def on_cancel():
        return views.ok("Cancelling...") if cancels.cancel_all() else "Nothing is running."

    run.click(_run_handler(ctx, cancels, order, out),
              [tool, overwrite, *(fields[k][n] for k, n in order)],
              [out.status, out.bar, out.result, out.imported, out.load, *adapters],
              api_name="run_tool", concurrency_limit=1, concurrency_id="tools",
              show_progress="minimal")  # a Run waiting for another shows its queue place
    out.load.click(_load_handler(ctx, out.status),
                   [out.imported, ctx.form["model.path"], ctx.form["dataset.path"]],
                   [*(ctx.form[k] for k in KEYS), ctx.tabs, out.status],
                   api_name="load_imported_preset")
    cancel.click(on_cancel, None, out.status, api_name="cancel_tool")
    tool.change(lambda chosen: [gr.Column(visible=k == chosen) for k in columns], tool,
                list(columns.values()), api_visibility="private")
    tab.select(lambda: _refreshed(ctx, adapters), None, adapters, api_visibility="private")


@dataclass
class Outputs:
    status: Any
    bar: Any
    result: Any
    imported: Any  # gr.State: the preset the last import wrote
    load: Any
    adapters: list


def _run_handler(ctx: Context, cancels: Cancels, order: list[tuple[str, str]], out: Outputs):
    """Run: the chosen tool's fields (`order` names every field of every
    tool), streamed into the tab as run_updates yields them."""

    def on_run(chosen: str, replace: bool, *values):
        form = {name: value for (key, name), value in zip(order, values, strict=True)
                if key == chosen}
        for shown in run_updates(ctx, cancels, chosen, {**form, "overwrite": replace}):
            update = {box: gr.skip() if value is None else value for box, value in
                      ((out.status, shown.status), (out.bar, shown.bar))}
            if shown.result is not None:  # the box shows only while it has a report
                update[out.result] = gr.Code(value=shown.result, visible=bool(shown.result))
            if shown.wrote is not None:  # the next tool can take the new adapter
                update.update(_refreshed(ctx, out.adapters))
                preset = chosen == "import-kohya"
                update.update({out.imported: str(shown.wrote.path) if preset else "",
                               out.load: gr.Button(visible=preset)})
            yield update

    return on_run


def _load_handler(ctx: Context, status):
    def on_load(path: str, model_path: str, dataset_path: str):
        try:
            config = presets.load(path, ctx.dirs)
        except UserError as error:
            return {status: views.problem(str(error))}
        # As the Train tab's preset list does: the paths entered stay.
        config.model.path = config.model.path or model_path
        config.dataset.path = config.dataset.path or dataset_path
        values = dict(zip((ctx.form[k] for k in KEYS), config_to_values(config), strict=True))
        return {**values, ctx.tabs: gr.Tabs(selected="train"),
                status: views.ok(f"Loaded the preset {Path(path).stem} into the Train tab.")}

    return on_load


def _refreshed(ctx: Context, adapters: list) -> dict:
    found = adapter_choices(ctx)
    return {box: gr.Dropdown(choices=found) for box in adapters}
