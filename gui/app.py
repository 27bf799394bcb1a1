"""The page: a welcome box offering the demo, then one tab per step."""

from __future__ import annotations

from gui import dataset_tab, export_tab, exports, preview_tab, tools_tab, train_tab
from gui.datadir import DataDirs
from gui.form import SPECS, make_component
from gui.handlers import Context
from gui.jobs import JobRunner

INTRO = """# LoRA trainer
Train LoRA, LoCon, LoHa and LoKr adapters, with or without DoRA (and LCM-LoRAs), for
Stable Diffusion 1.x on this computer.
**Dataset** → **Train** → **Preview** → **Export**."""

WELCOME = """### New here?
No base model is set yet. The demo fills the Train tab with a built-in toy model that
draws coloured shapes from their names and teaches it a new one, "mychar" (a yellow
star), on a CPU in about two minutes: the previews turn from the toy's own drawing into
stars. Then use your own model (an SD 1.5 `.safetensors` file) and images."""


def build_ui(dirs: DataDirs, runner: JobRunner):
    import gradio as gr

    form = {spec.key: make_component(spec) for spec in SPECS}
    # Runs started here go where the Export tab looks, not into the working folder.
    form["output.dir"].value = str(dirs.outputs / "{name}")
    with gr.Blocks(title="LoRA trainer") as ui:
        gr.Markdown(INTRO)
        # Two boxes: the Train tab shows the inner one while no base model is
        # set; the outer one hides both for good once any run exists, so the
        # newcomer's box never comes back on a reload or a cleared model path.
        with gr.Column(visible=True, elem_id="welcome-frame") as frame:
            with gr.Column(visible=True, elem_id="welcome") as welcome:
                gr.Markdown(WELCOME)
                demo_button = gr.Button("Load the demo settings", variant="primary",
                                        elem_id="load-demo")
        with gr.Tabs(selected="dataset") as tabs:
            ctx = Context(dirs=dirs, runner=runner, form=form, tabs=tabs)
            with gr.Tab("Dataset", id="dataset", elem_id="tab-dataset"):
                dataset_tab.build(ctx)
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                train_tab.build(ctx, demo_button, welcome)
            with gr.Tab("Preview", id="preview", elem_id="tab-preview") as preview:
                preview_tab.build(ctx, preview)
            with gr.Tab("Export", id="export", elem_id="tab-export") as export:
                export_tab.build(ctx, export)
            with gr.Tab("Tools", id="tools", elem_id="tab-tools") as tools:
                tools_tab.build(ctx, tools)

        def newcomer() -> dict:
            return {frame: gr.Column(visible=not exports.any_run(dirs, runner))}

        ui.load(newcomer, None, frame, api_name="newcomer")
        form["model.path"].change(newcomer, None, frame, api_visibility="private")
    return ui
