"""The Train tab: presets, the generated form, Start / Stop / Resume and the
live view of the job."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from core.errors import UserError
from gui import exports, presets, views
from gui.datasets import check
from gui.estimate_view import run_estimate
from gui.form import KEYS, SPECS, config_to_values, overrides_between, values_to_config
from gui.handlers import Context, reports_to
from gui.jobs import Job, Status
from gui.monitor import Monitor
from networks.algorithms import choices as algorithm_choices
from trainer.config import (
    SECTIONS,
    TrainConfig,
    config_to_toml,
    load_config,
    output_dir,
    preset_paths,
)
from trainer.demo_assets import DATASET_KEYWORDS

# The settings most runs touch, in rows; the Advanced accordion has the rest.
MAIN_ROWS = (
    ("model.path", "dataset.path"),
    ("network.rank", "network.alpha", "network.conv_rank", "network.conv_alpha"),
    ("train.steps", "train.epochs", "train.batch_size", "dataset.resolution"),
    ("train.unet_lr", "train.text_encoder_lr", "output.name"),
    ("sample.prompts", "sample.every_n_steps"),
)
MAIN = {key for row in MAIN_ROWS for key in row}
# The settings the memory estimate depends on (trainer/estimate.py).
MEMORY_KEYS = ("model.path", "model.base_precision", "dataset.path", "dataset.resolution",
               "dataset.cache_latents", "network.type", "network.rank", "network.conv_rank",
               "network.train_unet", "network.train_text_encoder", "train.batch_size",
               "train.optimizer", "train.mixed_precision", "train.gradient_checkpointing")
ADVANCED_COLUMNS = 4
# One choice for what the schema keeps in two fields (task and network.type).
KINDS = [*algorithm_choices(), ("LCM distillation (makes an LCM-LoRA)", "lcm_distill")]


def loss_frame(metrics, validation=()):
    """The plot's data, typed even when empty: an untyped empty frame makes
    the plot treat its axes as categories for good. One row per point, the
    `series` column tells the training loss from the validation loss."""
    import pandas as pd

    points = ([(m.step, m.loss, "train") for m in metrics]
              + [(v.step, v.val_loss, "validation") for v in validation])
    return pd.DataFrame({"step": pd.Series([p[0] for p in points], dtype="int64"),
                         "loss": pd.Series([p[1] for p in points], dtype="float64"),
                         "series": pd.Series([p[2] for p in points], dtype="object")})


def loss_plot(metrics, validation=(), best: str = ""):
    """The plot's update. Its legend names the series each time: Gradio 6.31
    keeps the colour legend of the first frame it drew (measured in Chromium),
    so validation, which starts later, would have no entry. No points: None
    (a plot first drawn from an empty frame never shows a legend)."""
    frame = loss_frame(metrics, validation)
    series = ["train"] * bool(metrics) + ["validation"] * bool(validation)
    return gr.LinePlot(value=frame if len(frame) else None, colors_in_legend=series or None,
                       caption=best or None)


def pick_resumable(ids: tuple[int, ...], seen: tuple[int, ...] | None, chosen) -> int | None:
    """The picker's value after the resumable jobs changed: a job that just
    became resumable (the one the user just stopped), else the user's choice
    while it is still offered, else the newest."""
    fresh = [i for i in ids if seen is not None and i not in seen]
    if fresh:
        return max(fresh)
    if seen is not None and str(chosen) in map(str, ids):
        return int(chosen)
    return ids[0] if ids else None


def kind_of(task: str, network_type: str) -> str:
    return "lcm_distill" if task == "lcm_distill" else network_type


def fields_of_kind(kind: str) -> tuple[str, str]:
    """(task, network.type) for an Adapter choice; LCM-LoRAs adapt the
    convolutions too, as the sd15-lcm-distill preset does."""
    return ("lcm_distill", "locon") if kind == "lcm_distill" else ("train", kind)


def validated(values) -> TrainConfig:
    return values_to_config(values, require_paths=True)


def memory_estimate(ctx: Context, preset: str | None, values) -> str:
    """Markdown: the memory the form's run would need (`python -m trainer estimate`
    in a child, on the same base and overrides Start would use), or why there is none."""
    base_path = presets.base_path(preset, ctx.dirs)
    config = values_to_config(values)  # paths may be missing yet: the estimate says so
    return run_estimate(base_path, overrides_between(load_config(base_path), config))


def start_job(ctx: Context, preset: str | None, values) -> str:
    """Validate everything the page can check, then queue the run."""
    base_path = presets.base_path(preset, ctx.dirs)  # refuses a file that is no preset
    config = validated(values)
    folder = output_dir(config)
    ctx.runner.check_free(folder)  # a job of this app, or a trainer it does not know, there
    if presets.holds_run(folder):
        raise UserError(f"{folder} already holds an earlier run of {config.output.name}. Press "
                        "Resume to continue it, or change output.name to start a new one "
                        f"(e.g. {presets.free_output_name(config)}).")
    if config.dataset.path not in DATASET_KEYWORDS:  # the built-ins need no check
        d = config.dataset
        result = check(d.path, d.resolution, d.buckets, d.min_bucket, d.max_bucket,
                       d.bucket_step, d.no_upscale, d.caption_extension, repeats=d.repeats)
        if result.report is None:
            raise UserError(result.message)
        if not result.trainable:
            from gui.datasets import list_images, tag_counts

            tags = tag_counts(list_images(Path(d.path), d.caption_extension))
            return (views.problem(f"The dataset {d.path} cannot be trained on yet; nothing "
                                  "was started. The report:") + "\n\n"
                    + views.check_report(result.report, tags))
    overrides = overrides_between(load_config(base_path), config)
    job = ctx.runner.submit(str(base_path), overrides, str(folder), config.output.name,
                            config.train.steps)
    waiting = "queued behind the running job" if job.status is Status.QUEUED else "started"
    return views.ok(f"Job {job.id} {waiting}.") + f"\n\n```text\n{job.command_line()}\n```"


def resume_job(ctx: Context, job_id, values) -> str:
    """Resume the chosen job, or without one the run the form describes."""
    if job_id in (None, ""):
        job = resume_form_run(ctx, values)
    else:
        try:
            chosen = int(job_id)
        except (TypeError, ValueError):
            raise UserError(f"{job_id!r} is not a job; choose one under Job to resume.") from None
        job = ctx.runner.resume(chosen)
    waiting = " (queued behind the running job)" if job.status is Status.QUEUED else ""
    return (views.ok(f"Job {job.id} resumes {job.name}{waiting}.")
            + f"\n\n```text\n{job.command_line()}\n```")


def resume_form_run(ctx: Context, values) -> Job:
    """Nothing to resume in this app's history: the run in the form's output folder."""
    config = validated(values)
    folder = output_dir(config)
    ctx.runner.check_free(folder)
    saved = presets.saved_step(folder)
    if saved is None:
        raise UserError(f"{folder} holds no saved training state to resume; press Start "
                        "instead.")
    if saved >= config.train.steps > 0:
        raise UserError(f"{config.output.name} already finished its {saved} steps; raise "
                        "train.steps to train it further, then press Resume.")
    base = ctx.dirs.base_config
    return ctx.runner.submit(str(base), overrides_between(load_config(base), config),
                             str(folder), config.output.name, config.train.steps, resume=True)


def live_view(ctx: Context, monitor: Monitor, last_seen, chosen) -> list | None:
    """The timer's outputs: the seen-state, the job's view and the job picker
    (skipped while its jobs are the same: a redrawn picker closes under the
    mouse); None when nothing changed."""
    signature = monitor.signature()
    seen_signature, seen_ids = last_seen or (None, None)
    if signature == seen_signature:
        return None
    view = monitor.view()
    choices = monitor.resume_choices()
    ids = tuple(value for _, value in choices)
    picker = gr.skip() if ids == seen_ids else gr.Dropdown(
        choices=choices, value=pick_resumable(ids, seen_ids, chosen))
    plot = loss_plot(view["metrics"], view.get("validation", ()), view.get("best", ""))
    return [(signature, ids), view["status"], view["progress"], plot,
            [str(exports.servable(Path(p), ctx.dirs)) for p in view["samples"]], view["log"],
            view["jobs"], picker]


def build(ctx: Context, demo_button, welcome) -> None:
    form, runner, monitor = ctx.form, ctx.runner, Monitor(ctx.runner)
    inputs = [form[k] for k in KEYS]
    with gr.Row():
        preset = gr.Dropdown(label="Preset", choices=presets.choices(ctx.dirs), value=None,
                             info="Fills the form; the paths you entered stay.",
                             elem_id="train-preset")
        kind = gr.Dropdown(label="Adapter", choices=KINDS, value="lora", elem_id="train-kind",
                           info="Sets task and network.type (see Advanced).")
    for row in MAIN_ROWS:
        with gr.Row():
            for key in row:
                form[key].render()
    with gr.Accordion("Advanced: every setting", open=False, elem_id="train-advanced"):
        for section in ("", *SECTIONS):
            keys = [s.key for s in SPECS if s.section == section and s.key not in MAIN]
            if keys:
                gr.Markdown(f"**[{section}]**" if section else "**top level**")
                for start in range(0, len(keys), ADVANCED_COLUMNS):
                    with gr.Row():
                        for key in keys[start: start + ADVANCED_COLUMNS]:
                            form[key].render()
    with gr.Row():
        start = gr.Button("Start", variant="primary", elem_id="train-start")
        stop = gr.Button("Stop", variant="stop", elem_id="train-stop")
        resume = gr.Button("Resume", elem_id="train-resume")
        estimate = gr.Button("Estimate memory", elem_id="train-estimate")
        # Custom values pass: a page older than the app's job list sends ids
        # the component does not know, and the runner explains what is wrong.
        resume_job_id = gr.Dropdown(label="Job to resume", choices=[], value=None, scale=2,
                                    allow_custom_value=True, elem_id="train-resume-job",
                                    info="Stopped, failed and interrupted runs; empty: the "
                                         "run in the form.")
    with gr.Row():
        preset_name = gr.Textbox(label="Preset name", scale=3, elem_id="train-preset-name")
        save = gr.Button("Save preset", scale=1, elem_id="train-save-preset")
        show = gr.Button("Show config as TOML", scale=1, elem_id="train-show-config")
    status = gr.Markdown(elem_id="train-status")
    estimate_md = gr.Markdown(elem_id="train-estimate-view")
    toml = gr.Code(label="config.toml", language=None, visible=False, elem_id="train-toml")
    job_md = gr.Markdown(elem_id="train-job")
    progress = gr.Markdown(elem_id="train-progress")
    with gr.Row():
        plot = gr.LinePlot(None, x="step", y="loss", color="series", label="Loss",
                           height=260, scale=3, elem_id="train-loss")
        previews = gr.Gallery(label="Newest previews", columns=2, height=260, scale=2,
                              allow_preview=True, elem_id="train-previews")
    log = gr.Textbox(label="Log (end)", lines=8, max_lines=8, interactive=False,
                     autoscroll=True, elem_id="train-log")
    jobs_md = gr.Markdown(elem_id="train-jobs")
    seen = gr.State(None)
    timer = gr.Timer(1.0)

    def fill(config: TrainConfig, message: str) -> dict:
        values = dict(zip(inputs, config_to_values(config), strict=True))
        return {**values, kind: kind_of(config.task, config.network.type),
                status: views.ok(message)}

    @reports_to(status)
    def load_preset(path: str | None, model_path: str, dataset_path: str):
        config = presets.load(path, ctx.dirs)
        # Presets leave the paths empty for the user: keep what is entered.
        config.model.path = config.model.path or model_path
        config.dataset.path = config.dataset.path or dataset_path
        return fill(config, f"Loaded the preset {Path(path).stem}.")

    @reports_to(status)
    def load_demo():
        config = presets.load(str(preset_paths()[presets.DEMO_PRESET]), ctx.dirs)
        config.output.name = presets.free_output_name(config)
        return {**fill(config, "The demo settings are in the form: a built-in toy model that "
                               "draws coloured shapes learns a new one, \"mychar\" (a yellow "
                               "star), on the CPU in about two minutes. Press Start and watch "
                               "the previews."),
                preset: str(preset_paths()[presets.DEMO_PRESET]),
                ctx.tabs: gr.Tabs(selected="train"), welcome: gr.Column(visible=False)}

    @reports_to(status)
    def on_start(path: str | None, *values):
        return {status: start_job(ctx, path, values)}

    @reports_to(estimate_md)
    def on_estimate(path: str | None, *values):
        return {estimate_md: memory_estimate(ctx, path, values)}

    @reports_to(status)
    def on_stop():
        job = runner.current() or next((j for j in runner.jobs() if j.status is Status.QUEUED),
                                       None)
        if job is None:
            raise UserError("Nothing is running.")
        runner.stop(job.id)
        return {status: views.ok(f"Stopping job {job.id}: the state is saved at the end of the "
                                 "current step.")}

    @reports_to(status)
    def on_resume(job_id, *values):
        return {status: resume_job(ctx, job_id, values)}

    @reports_to(status)
    def on_save(name: str, *values):
        path = presets.save(values_to_config(values), name, ctx.dirs)
        return {status: views.ok(f"Saved the preset {path}."),
                preset: gr.Dropdown(choices=presets.choices(ctx.dirs), value=str(path))}

    @reports_to(status)
    def on_show(*values):
        return {toml: gr.Code(value=config_to_toml(values_to_config(values)), visible=True),
                status: ""}

    def refresh(last_seen, chosen):
        try:
            return live_view(ctx, monitor, last_seen, chosen) or [gr.skip()] * len(live)
        except OSError as error:  # e.g. a log made unreadable: said, and tried again next tick
            where = f" ({error.filename})" if error.filename else ""
            return [gr.skip(), views.problem(f"Cannot read the job's files: "
                                             f"{error.strerror or error}{where}."),
                    *[gr.skip()] * (len(live) - 2)]

    form_out = [*inputs, kind, status]
    preset.input(load_preset, [preset, form["model.path"], form["dataset.path"]], form_out,
                 api_name="load_preset").then(on_estimate, [preset, *inputs], estimate_md,
                                              api_visibility="private")
    estimate.click(on_estimate, [preset, *inputs], estimate_md, api_name="estimate_memory")
    # The estimate follows the settings that change memory; "always_last" runs
    # only the newest of the edits made while one estimate is computing.
    gr.on([form[key].input for key in MEMORY_KEYS], on_estimate, [preset, *inputs], estimate_md,
          trigger_mode="always_last", show_progress="hidden", api_visibility="private")
    demo_button.click(load_demo, None, [*form_out, preset, ctx.tabs, welcome],
                      api_name="load_demo").then(on_estimate, [preset, *inputs], estimate_md,
                                                 api_visibility="private")
    kind.input(fields_of_kind, kind, [form["task"], form["network.type"]],
               api_visibility="private")
    gr.on([form["task"].change, form["network.type"].change], kind_of,
          [form["task"], form["network.type"]], kind, api_visibility="private")
    form["model.path"].change(lambda p: gr.Column(visible=not p.strip()), form["model.path"],
                              welcome, api_visibility="private")
    start.click(on_start, [preset, *inputs], status, api_name="start")
    stop.click(on_stop, None, status, api_name="stop")
    resume.click(on_resume, [resume_job_id, *inputs], status, api_name="resume")
    save.click(on_save, [preset_name, *inputs], [status, preset], api_name="save_preset")
    show.click(on_show, inputs, [toml, status], api_name="show_config")
    live = [seen, job_md, progress, plot, previews, log, jobs_md, resume_job_id]
    timer.tick(refresh, [seen, resume_job_id], live, show_progress="hidden", api_name="refresh")
