"""The Preview tab: one image from a base model with LoRAs (and an LCM-LoRA),
by `python -m trainer sample` in a child process."""

from __future__ import annotations

import math
import time
from pathlib import Path

import gradio as gr

from core.errors import UserError
from gui import exports, paths, views
from gui.cli_runs import explain_failure, python_module, run_cli
from gui.handlers import Context, reports_to

GALLERY_SIZE = 12


def sample_arguments(model: str, loras: str, lcm: str, decoder: str, prompt: str, negative: str,
                     seed, steps, guidance, size: str, out: Path) -> list[str]:
    """The CLI's arguments; empty steps/guidance leave the CLI's defaults
    (20 steps at 7.0, or 4 steps at 1.0 with an LCM-LoRA). Both come as text
    (or numbers, through the API): a number box shows 0 for "no value", and a
    0 sent on would mean 0 guidance, not the default."""
    if not model.strip():
        raise UserError('Enter the base model: a .safetensors file, a diffusers folder or "demo".')
    if not prompt.strip():
        raise UserError("Enter a prompt.")
    args = ["sample", "--model", model.strip(), "--prompt", prompt.strip(),
            "--negative", negative.strip(), "--size", size.strip() or "512x512",
            "--seed", str(int(seed or 0)), "--out", str(out)]
    for line in loras.splitlines():
        if line.strip():
            args += ["--lora", adapter_argument(line.strip(), "--lora")]
    if lcm.strip():
        args += ["--lcm-lora", adapter_argument(lcm.strip(), "--lcm-lora")]
    if decoder.strip():
        args += ["--preview-decoder", decoder.strip()]
    steps, guidance = optional_number(steps, "Steps", int), optional_number(guidance,
                                                                            "Guidance", float)
    if steps is not None:
        args += ["--steps", str(steps)]
    if guidance is not None:
        args += ["--guidance", str(guidance)]
    return args


def optional_number(value, label: str, kind: type[int] | type[float]) -> int | float | None:
    """None for an empty box (the default), else the number typed in it."""
    text = "" if value is None else str(value).strip()
    if not text:
        return None
    try:
        number = float(text)
        if not math.isfinite(number) or (kind is int and not number.is_integer()):
            raise ValueError(text)
    except ValueError:
        what = "a whole number such as 20" if kind is int else "a number such as 7.5"
        raise UserError(f"{label} {text!r} is not {what}; leave it empty for the default.") \
            from None
    return kind(number)


def adapter_argument(text: str, option: str) -> str:
    """FILE or FILE:WEIGHT, parsed as the sample CLI does; an existing file
    must be a LoRA/LyCORIS adapter, so the page never has another file read
    as one. A missing file is left to the CLI, which says so."""
    file = text if Path(text).is_file() or ":" not in text else text.rpartition(":")[0]
    if Path(file).is_file():
        paths.adapter_file(file, f"{option} takes a LoRA .safetensors file")
    return text


def build(ctx: Context, tab) -> None:
    folder = ctx.dirs.previews

    def gallery_items() -> list[str]:
        return [str(p) for p in sorted(folder.glob("*.png"), reverse=True)[:GALLERY_SIZE]]

    with gr.Row():
        model = gr.Textbox(label="Base model", value="demo", scale=4, elem_id="pv-model",
                           info='.safetensors file, diffusers folder, or "demo".')
        same = gr.Button("Use the Train tab's model", scale=1)
    with gr.Row():
        loras = gr.Textbox(label="LoRA files, one per line: FILE or FILE:WEIGHT", lines=3,
                           scale=4, elem_id="pv-loras")
        add = gr.Dropdown(label="Add a trained adapter", choices=[], scale=2, elem_id="pv-add")
    lcm = gr.Textbox(label="LCM-LoRA (optional): FILE or FILE:WEIGHT", elem_id="pv-lcm",
                     info="Samples with the LCM scheduler: 4 steps at guidance 1.0 by default.")
    decoder = gr.Textbox(label="Preview decoder (optional): TAESD folder", elem_id="pv-decoder",
                         info="madebyollin/taesd in diffusers AutoencoderTiny layout: decodes "
                              "several times faster than the VAE, a little softer.")
    prompt = gr.Textbox(label="Prompt", value="a photo of a cat", elem_id="pv-prompt")
    negative = gr.Textbox(label="Negative prompt")
    with gr.Row():
        seed = gr.Number(label="Seed", value=1234, precision=0)
        # Text boxes: a number box cannot be empty, and shows 0 instead.
        steps = gr.Textbox(label="Steps", value="", elem_id="pv-steps",
                           placeholder="default", info="Empty: 20, or 4 with an LCM-LoRA.")
        guidance = gr.Textbox(label="Guidance", value="", elem_id="pv-guidance",
                              placeholder="default", info="Empty: 7.0, or 1.0 with an LCM-LoRA.")
        size = gr.Textbox(label="Size (WxH)", value="512x512", elem_id="pv-size")
    generate = gr.Button("Generate", variant="primary", elem_id="pv-generate")
    status = gr.Markdown(elem_id="pv-status")
    gallery = gr.Gallery(value=gallery_items, label="Previews, newest first", columns=4,
                         height=360, elem_id="pv-gallery")

    @reports_to(status)
    def on_generate(*values):
        out = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{time.monotonic_ns() % 10**6}.png"
        args = sample_arguments(*values, out=out)
        started = time.perf_counter()
        result = run_cli(python_module("trainer", *args), "Sampling", timeout=3600)
        if result.returncode != 0:
            raise UserError(explain_failure(result.returncode, result.stderr, "Sampling"))
        return {gallery: gallery_items(),
                status: views.ok(f"{out.name} in {time.perf_counter() - started:.0f} s.")}

    def with_added(current: str, path: str | None) -> str:
        if not path:
            return current
        return (current.rstrip() + "\n" if current.strip() else "") + f"{path}:1.0"

    def on_tab():
        return gr.Dropdown(choices=[(exports.label(p), str(p)) for p in
                                    exports.adapter_files(ctx.dirs, ctx.runner)], value=None)

    generate.click(on_generate, [model, loras, lcm, decoder, prompt, negative, seed, steps,
                                 guidance, size], [gallery, status], api_name="generate")
    add.input(with_added, [loras, add], loras, api_visibility="private")
    same.click(lambda m: m or "demo", ctx.form["model.path"], model, api_visibility="private")
    tab.select(on_tab, None, add, api_name="list_preview_adapters")
