"""Local web GUI: `python app.py` serves http://127.0.0.1:7860.

Argument parsing and launch only; the page is built in `gui/`. The GUI
process never imports torch or diffusers: training, sampling, checks and
inspection run as the project's CLIs in child processes.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from core.errors import UserError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="LoRA trainer web GUI")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (another than localhost needs --auth)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true",
                        help="also serve through a public Gradio link (needs --auth)")
    parser.add_argument("--auth", metavar="USER:PASS",
                        help="require this login; needed with --share or a non-local --host")
    parser.add_argument("--data-dir", metavar="DIR",
                        help="datasets, presets, runs and previews made in the GUI "
                             "(default $LORA_TRAINER_DATA or ~/.local/share/lora-trainer)")
    return parser.parse_args(argv)


def check_exposure(args: argparse.Namespace) -> tuple[str, str] | None:
    """The login to require; refuses to expose the app without one, because
    the page can read and write files as the user running it."""
    exposed = args.share or args.host not in LOCAL_HOSTS
    if args.auth is None:
        if exposed:
            where = "--share" if args.share else f"--host {args.host}"
            raise UserError(f"{where} makes the app reachable from other machines, and it can "
                            "read and write your files; add --auth USER:PASS.")
        return None
    user, colon, password = args.auth.partition(":")
    if not (user and colon and password):
        raise UserError("--auth expects USER:PASS, e.g. --auth alice:long-password.")
    return user, password


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        auth = check_exposure(args)
    except UserError as error:
        # The CLIs' convention: one line on stderr, exit status 2.
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    # No usage reporting (and no network wait at start-up on offline machines).
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from gui.app import build_ui
    from gui.datadir import DataDirs, default_data_dir
    from gui.jobs import JobRunner

    root = default_data_dir() if args.data_dir is None else Path(args.data_dir).absolute()
    dirs = DataDirs(root).create()
    runner = JobRunner(dirs.jobs)

    def stop_cleanly(signum, frame):
        # The trainer saves its state on SIGTERM: stop it before leaving, so
        # closing the app never loses the steps trained since the last save.
        runner.shutdown()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop_cleanly)
    ui = build_ui(dirs, runner)
    try:
        # Blocks until Ctrl-C. The trainer runs in a session of its own
        # (gui/jobs.py), so Ctrl-C reaches only the app; shutdown() below stops
        # the trainer with SIGTERM and waits while it saves its state.
        # Gradio serves the data folder, its own upload folder and the files
        # handlers return; what those may be is decided in gui/paths.py.
        ui.launch(server_name=args.host, server_port=args.port, share=args.share, auth=auth,
                  allowed_paths=[str(dirs.root)], show_error=True)
    except OSError as error:
        print(f"error: cannot serve on {args.host}:{args.port} ({error}); is another copy "
              "running? Use --port to pick another port.", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        runner.shutdown()


if __name__ == "__main__":
    main()
