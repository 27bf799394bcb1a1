"""Local web GUI (placeholder until issue [5/5]).

Serves on 127.0.0.1:7860 by default. The GUI process never imports torch or
diffusers: training and sampling run as the trainer CLI in their own process.
"""

from __future__ import annotations

import argparse

INTRO = """
# LoRA trainer

The browser workflow (dataset, training, previews, export) is being built.
Meanwhile every step works from the command line:

- `python -m trainer make-demo-model DIR` writes a tiny SD1-shaped model to try things on.
- `python -m networks inspect FILE.safetensors` describes an adapter file and
  flags what other tools could not load.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="LoRA trainer web GUI")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=7860)
    return parser.parse_args(argv)


def build_ui():
    import gradio as gr

    with gr.Blocks(title="LoRA trainer") as ui:
        gr.Markdown(INTRO)
    return ui


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    build_ui().launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
