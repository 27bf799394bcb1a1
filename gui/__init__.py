"""The local web GUI (Gradio).

The GUI process never imports torch or diffusers: training, sampling,
dataset checks and adapter inspection run as the project's CLIs in their own
processes (`gui.cli_runs`, `gui.jobs`), so the page answers within seconds
and a crash or out-of-memory in the heavy work never takes the page down.
"""
