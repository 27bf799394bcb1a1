"""The Dataset tab: choose or upload images, edit captions, check the folder."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from core.errors import UserError
from gui import datasets, uploads, views
from gui.datadir import safe_name
from gui.handlers import Context, reports_to

# The [dataset] settings the check shares with training: the bucket ones in
# `datasets.check`'s argument order, then dataset.repeats and dataset.strict.
CHECK_KEYS = ("dataset.resolution", "dataset.buckets", "dataset.min_bucket",
              "dataset.max_bucket", "dataset.bucket_step", "dataset.no_upscale",
              "dataset.repeats", "dataset.strict")


def build(ctx: Context) -> None:
    gr.Markdown("Point to a folder of images with `.txt` captions (kohya `10_name` subfolders "
                "repeat 10 times), upload images or a zip, or start from the demo images.")
    with gr.Row():
        folder = gr.Textbox(label="Dataset folder (on this computer)", scale=5,
                            placeholder="/path/to/images", elem_id="ds-folder")
        open_button = gr.Button("Open folder", scale=1, elem_id="ds-open")
        cancel_button = gr.Button("Cancel scan", scale=1, elem_id="ds-cancel")
    with gr.Row():
        demo_button = gr.Button("Copy the demo images into my datasets", elem_id="ds-demo")
        use_button = gr.Button("Use this dataset for training", variant="primary",
                               elem_id="ds-use")
    with gr.Accordion("Upload images or a zip", open=False):
        uploads_box = gr.File(label="Images, .txt captions or .zip", file_count="multiple",
                              elem_id="ds-uploads")
        upload_name = gr.Textbox(label="Dataset name", value="my-dataset")
        upload_button = gr.Button("Upload into my datasets", elem_id="ds-upload")
    status = gr.Markdown(elem_id="ds-status")
    gallery = gr.Gallery(label="Images", columns=6, height=360, allow_preview=False,
                         elem_id="ds-gallery")
    with gr.Row():
        image = gr.Dropdown(label="Image", choices=[], scale=2, elem_id="ds-image")
        caption = gr.Textbox(label="Caption", scale=5, elem_id="ds-caption")
        save_button = gr.Button("Save caption", scale=1, elem_id="ds-save")
    with gr.Accordion("Caption tools", open=False):
        with gr.Row():
            trigger = gr.Textbox(label="Trigger word", placeholder="sks", elem_id="ds-trigger")
            trigger_button = gr.Button("Add to the front of every caption")
        with gr.Row():
            find = gr.Textbox(label="Find tag", elem_id="ds-find")
            replace = gr.Textbox(label="Replace with (empty: remove the tag)")
            replace_button = gr.Button("Replace in every caption")
    check_button = gr.Button("Check dataset", elem_id="ds-check")
    report = gr.Markdown(elem_id="ds-report")

    extension = ctx.form["dataset.caption_extension"]
    shown = gr.State([])  # the gallery's images in order: a click gives only an index
    listing = [folder, gallery, image, shown, status]
    rules, cancels = ctx.paths, ctx.cancels

    def show(path: Path, ext: str, message: str, selected: str | None = None,
             cancel=None) -> dict:
        items = datasets.list_images(path, ext, cancel)
        first = items[: datasets.GALLERY_LIMIT]
        thumbs = [(datasets.thumbnail(i.path, ctx.dirs.thumbs), i) for i in first]
        names = [i.rel_path for t, i in thumbs if t]
        if len(items) > len(first):
            message += (f" The gallery shows the first {len(first)} of {len(items)} images; "
                        "caption tools apply to all.")
        return {
            folder: str(path),
            gallery: [(str(t), f"{i.rel_path}: {i.caption}") for t, i in thumbs if t],
            image: gr.Dropdown(choices=names, value=selected if selected in names else None),
            shown: names,
            status: views.ok(message) if names else views.problem(
                f"No usable image in {path}; press Check dataset to see why."),
        }

    @reports_to(status)
    def open_dataset(text: str, ext: str):
        path = rules.open_dataset(text)
        with cancels.running() as cancel:  # Cancel stops the scan of a folder far too big
            return show(path, ext, f"Opened {path}.", cancel=cancel)

    # The folders the app made itself are listed without a cancel switch: a
    # cancelled listing would read as a cancelled copy or upload.
    @reports_to(status)
    def copy_demo(ext: str):
        path = rules.register(datasets.copy_demo(ctx.dirs.datasets))
        return show(path, ext, f"The demo images are in {path}; edits there never change the "
                               "original.")

    @reports_to(status)
    def upload(files: list[str] | None, name: str, ext: str):
        target, count = uploads.import_files(files or [], ctx.dirs.datasets,
                                             safe_name(name, "my-dataset"))
        return show(rules.register(target), ext, f"Added {count} files to {target}.")

    @reports_to(status)
    def read_caption(text: str, rel: str | None, ext: str):
        if not rel:
            return {caption: ""}
        return {caption: datasets.read_caption(rules.dataset(text), rel, ext)}

    @reports_to(status)
    def save_caption(text: str, rel: str | None, new: str, ext: str):
        if not rel:
            raise UserError("Pick an image (click it in the gallery) before saving a caption.")
        path = rules.dataset(text)
        written = datasets.save_caption(path, rel, new, ext)
        return show(path, ext, f"Saved {written.name}.", selected=rel)

    @reports_to(status)
    def add_trigger(text: str, word: str, ext: str):
        path = rules.dataset(text)
        with cancels.running() as cancel:
            count = datasets.add_trigger(path, word, ext, cancel)
        return show(path, ext, f"Added '{word.strip()}' to {count} captions.")

    @reports_to(status)
    def replace_tag(text: str, old: str, new: str, ext: str):
        path = rules.dataset(text)
        with cancels.running() as cancel:
            count = datasets.replace_tag(path, old, new, ext, cancel)
        return show(path, ext, f"Changed {count} captions.")

    @reports_to(report)
    def check(text: str, ext: str, *values):
        path = rules.dataset(text)
        *settings, reg_text = values  # dataset.reg_path last: the API keeps its order
        if any(value is None for value in settings):
            raise UserError("A [dataset] number in the Train tab's Advanced settings is empty "
                            f"({', '.join(CHECK_KEYS)}); the check uses them, as training does.")
        *bucket_settings, repeats, strict = settings
        with cancels.running() as cancel:
            result = datasets.check(str(path), *bucket_settings, ext, cancel=cancel,
                                    repeats=int(repeats), strict=bool(strict))
            if result.report is None:
                raise UserError(result.message)
            tags = datasets.tag_counts(datasets.list_images(path, ext, cancel))
            shown = views.check_report(result.report, tags)
            if reg_text and reg_text.strip():  # dataset.reg_path, checked alike
                shown += "\n\n" + datasets.reg_check(
                    rules.open_dataset(reg_text), result.report, bucket_settings, ext, cancel,
                    strict=bool(strict))
        return {report: shown}

    @reports_to(status)
    def use(text: str):
        path = rules.open_dataset(text)
        return {ctx.form["dataset.path"]: str(path), ctx.tabs: gr.Tabs(selected="train"),
                status: views.ok(f"The Train tab now trains on {path}.")}

    def cancel_scans():
        count = cancels.cancel_all()
        if not count:
            return views.ok("Nothing to cancel: no scan or check is running.")
        what = "scan or check" if count == 1 else "scans and checks"
        return views.ok(f"Cancelled {count} running {what}.")

    def pick(names: list[str], evt: gr.SelectData):
        return gr.Dropdown(value=names[evt.index] if evt.index < len(names) else None)

    # A scan of a big folder must not hold up the next one or the Cancel
    # button: these run side by side (by default each event runs one at a time).
    free = {"concurrency_limit": None}
    scans = [
        open_button.click(open_dataset, [folder, extension], listing, api_name="open_dataset",
                          **free),
        folder.submit(open_dataset, [folder, extension], listing, api_visibility="private",
                      **free),
        check_button.click(check, [folder, extension, *(ctx.form[k] for k in CHECK_KEYS),
                                   ctx.form["dataset.reg_path"]],
                           [report], api_name="check_dataset", **free),
    ]
    demo_button.click(copy_demo, [extension], listing, api_name="copy_demo", **free)
    upload_button.click(upload, [uploads_box, upload_name, extension], listing,
                        api_name="upload", **free)
    gallery.select(pick, shown, image, api_visibility="private")
    image.change(read_caption, [folder, image, extension], [caption, status],
                 api_name="read_caption")
    save_button.click(save_caption, [folder, image, caption, extension], [*listing, caption],
                      api_name="save_caption")
    # Their scan stops on Cancel too (before any caption changes), with its message.
    trigger_button.click(add_trigger, [folder, trigger, extension], listing,
                         api_name="add_trigger")
    replace_button.click(replace_tag, [folder, find, replace, extension], listing,
                         api_name="replace_tag")
    use_button.click(use, [folder], [ctx.form["dataset.path"], ctx.tabs, status],
                     api_name="use_dataset", **free)
    cancel_button.click(cancel_scans, None, status, api_name="cancel_scan", cancels=scans,
                        **free)
