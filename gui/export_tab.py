"""The Export tab: the adapters the runs produced, their metadata, download
and copy to another app's LoRA folder."""

from __future__ import annotations

import gradio as gr

from gui import exports, views
from gui.handlers import Context, reports_to
from gui.safetensors_meta import read_metadata, update_metadata


def build(ctx: Context, tab) -> None:
    def choices() -> list[tuple[str, str]]:
        return [(exports.label(p), str(p)) for p in exports.adapter_files(ctx.dirs, ctx.runner)]

    with gr.Row():
        file = gr.Dropdown(label="Adapter file", choices=choices(), allow_custom_value=True,
                           scale=5, elem_id="export-file",
                           info="Files from your runs, newest first; or type a path.")
        refresh = gr.Button("Refresh list", scale=1, elem_id="export-refresh")
    status = gr.Markdown(elem_id="export-status")
    summary = gr.Markdown(elem_id="export-summary")
    fields = [gr.Textbox(label=name, info=f"Saved as {key}", elem_id=f"export-{key[10:]}")
              for name, key in exports.EDITABLE]
    save = gr.Button("Save metadata into the file", elem_id="export-save")
    download = gr.File(label="Download", interactive=False, elem_id="export-download")
    with gr.Row():
        folder = gr.Textbox(label="Copy to folder", scale=4, elem_id="export-folder",
                            placeholder="/path/to/stable-diffusion-webui/models/Lora")
        overwrite = gr.Checkbox(label="Overwrite", value=False, scale=1)
        copy = gr.Button("Copy", scale=1, elem_id="export-copy")

    @reports_to(status)
    def on_refresh(current: str | None = None):
        found = choices()
        # A value set here fires file.change, which shows that file's summary.
        chosen = exports.chosen_after_refresh([value for _, value in found], current)
        return {file: gr.Dropdown(choices=found, value=chosen),
                status: views.ok(exports.files_found(len(found))) if found else
                "No adapter files yet: train one in the Train tab."}

    @reports_to(status)
    def on_select(path: str | None):
        if not path:
            return {status: ""}
        report = exports.inspect(path)
        meta = report["metadata"]
        return {summary: exports.summary(report), status: "",
                download: str(exports.download(path, ctx.dirs)),
                **{box: meta.get(key, "") for box, (_, key) in zip(fields, exports.EDITABLE,
                                                                    strict=True)}}

    @reports_to(status)
    def on_save(path: str | None, *values: str):
        file = ctx.paths.writable_adapter(path or "")
        update_metadata(file, {key: value.strip() for (_, key), value in
                               zip(exports.EDITABLE, values, strict=True)})
        meta = read_metadata(file)
        return {status: views.ok(f"Saved the metadata of {file.name}; its tensor data and "
                                 "hashes are unchanged."),
                download: str(exports.servable(file, ctx.dirs)),
                **{box: meta.get(key, "") for box, (_, key) in zip(fields, exports.EDITABLE,
                                                                    strict=True)}}

    @reports_to(status)
    def on_copy(path: str | None, target: str, replace: bool):
        copied = exports.copy_to_folder(path or "", target, replace)
        return {status: views.ok(f"Copied to {copied}.")}

    refresh.click(on_refresh, file, [file, status], api_name="list_adapters")
    tab.select(on_refresh, file, [file, status], api_visibility="private")
    file.change(on_select, file, [summary, status, download, *fields], api_name="select_adapter")
    save.click(on_save, [file, *fields], [status, download, *fields], api_name="save_metadata")
    copy.click(on_copy, [file, folder, overwrite], status, api_name="copy_adapter")
