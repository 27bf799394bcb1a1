"""GUI start-up: `python app.py` until the page answers HTTP 200.

The target is under 5 s on a laptop CPU; `import gradio` alone takes 3-4 s
of it, so the GUI must not import torch or diffusers at start-up. Each run
uses a fresh data folder and a free port; the median is printed.

    python -m bench.gui_startup [--runs N]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_startup(data_dir: str) -> float:
    port = free_port()
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "app.py", "--port", str(port), "--data-dir", data_dir],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as page:
                    if page.status == 200:
                        return time.perf_counter() - started
            except OSError:
                if process.poll() is not None:
                    raise SystemExit("app.py exited:\n" + process.stderr.read().decode()) from None
                if time.perf_counter() - started > TIMEOUT_S:
                    raise SystemExit(f"no answer within {TIMEOUT_S} s") from None
                time.sleep(0.02)
    finally:
        process.terminate()
        process.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    times = []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory() as data_dir:
            times.append(time_startup(data_dir))
        print(f"run {run + 1}: {times[-1]:.2f} s")
    print(f"python app.py until HTTP 200: median {statistics.median(times):.2f} s "
          f"(min {min(times):.2f}, max {max(times):.2f}, {args.runs} runs)")


if __name__ == "__main__":
    main()
