"""A whole small job, ours against a plain diffusers + peft script, quiet and
under a competing CPU load.

The job: a 50-step plain LoRA (rank 4, alpha 4, AdamW, lr 1e-3) on the U-Net
of the demo model (`python -m trainer make-demo-model`), 8 generated 64 px
images with captions, batch 1, latents not cached (the VAE encodes every
step). Ours is `python -m trainer train CONFIG`; the reference is
bench/e2e_small_reference.py on the same layers, run with plain `python`
(not `accelerate launch`, so torch keeps its default of one thread per core).

Runs alternate (ours, reference, ours, ...) so that drift on a shared machine
hits both alike; `--pairs` pairs quiet, then `--pairs` pairs under load. The
load is `--load-procs` busy-looping Python processes (`while True: pass`,
one per usable core by default), started before and stopped after each
loaded run: another job keeping every core busy, as the issue's machine had.

Per run: wall time from starting the process to the final adapter file's
mtime, time until the first step ended, and the step times (ours: 1/it_s of
metrics.jsonl, the loop's own host time per step, kept per step although
the losses are read back in batches; the reference: its timing JSON).
Goals: ours <= 0.8x the reference's whole-job time, quiet and loaded,
and no step above 3x its run's median.

`--ours-env NAME=VALUE` sets a variable for our runs only (e.g.
OMP_NUM_THREADS=2, to override the count trainer/cpu_threads.py picks).
`--thread-sweep` runs ours only, with OMP_NUM_THREADS=1 against
OMP_NUM_THREADS=<cores>, to measure the thread rule of trainer/cpu_threads.py.

    python bench/e2e_small.py [--pairs 3] [--steps 50] [--thread-sweep]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make `bench` importable
    sys.path.insert(0, str(REPO))

from bench.e2e_small_report import print_table, summarise  # noqa: E402

IMAGES = 8
RESOLUTION = 64
RANK, ALPHA, LR = 4, 4.0, 1e-3
TIMEOUT_S = 1800


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def write_images(folder: Path) -> None:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    colours = [(220, 40, 40), (40, 180, 60), (40, 70, 220), (200, 190, 40)]
    for index in range(IMAGES):
        image = Image.new("RGB", (RESOLUTION, RESOLUTION), (245, 245, 240))
        draw = ImageDraw.Draw(image)
        box = (12, 12, RESOLUTION - 12, RESOLUTION - 12)
        shape, colour = ("circle", "square")[index // 4], colours[index % 4]
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=colour)
        image.save(folder / f"{index}.png")
        (folder / f"{index}.txt").write_text(f"a {shape}, colour {index % 4}, plain background\n")


def write_config(path: Path, model: Path, data: Path, out: Path, steps: int) -> None:
    path.write_text(f"""\
[model]
path = "{model}"

[dataset]
path = "{data}"
resolution = {RESOLUTION}
buckets = false
cache_latents = "off"

[network]
type = "lora"
rank = {RANK}
alpha = {ALPHA}
train_text_encoder = false

[train]
steps = {steps}
batch_size = 1
optimizer = "adamw"
unet_lr = {LR}

[output]
dir = "{out}"
name = "ours"
""")


def prepare(workdir: Path, steps: int) -> dict:
    model_root = workdir / "demo"
    if not (model_root / "diffusers" / "model_index.json").is_file():
        subprocess.run([sys.executable, "-m", "trainer", "make-demo-model", str(model_root)],
                       cwd=REPO, check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    data = workdir / "images"
    if not data.is_dir():
        write_images(data)
    config = workdir / "ours.toml"
    write_config(config, model_root / "diffusers", data, workdir / "ours-out", steps)
    return {"model": model_root / "diffusers", "data": data, "config": config,
            "ours_out": workdir / "ours-out", "workdir": workdir}


def _launch(command: list[str], env: dict, log: Path) -> float:
    """Run to the end; returns the wall-clock time.time() of the start."""
    started = time.time()
    with open(log, "wb") as sink:
        result = subprocess.run(command, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                timeout=TIMEOUT_S)  # fmt: skip
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}); see {log}")
    return started


def run_ours(paths: dict, env: dict) -> dict:
    out = paths["ours_out"]
    shutil.rmtree(out, ignore_errors=True)
    log = paths["workdir"] / "ours.log"
    command = [sys.executable, "-m", "trainer", "train", str(paths["config"])]
    started = _launch(command, env, log)
    ended = time.time()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    threads_line = next((line for line in log.read_text(errors="replace").splitlines()
                         if line.startswith("CPU threads:")), "")  # fmt: skip
    return {"wall_s": (out / "ours.safetensors").stat().st_mtime - started,
            "exit_s": ended - started, "first_step_s": first_step_end(records) - started,
            "step_s": [1 / r["it_s"] for r in records], "threads": threads_line}


def first_step_end(records: list[dict]) -> float:
    """When step 1 ended. A trainer that reads its losses every so often
    logs several steps at once, all stamped with the time of the read: the
    steps after the first in that read are taken back off."""
    read = [r for r in records if r["time"] - records[0]["time"] < 0.05]
    return records[0]["time"] - sum(1 / r["it_s"] for r in read[1:])


def run_reference(paths: dict, env: dict, steps: int) -> dict:
    workdir = paths["workdir"]
    out, timing = workdir / "reference.safetensors", workdir / "reference-timing.json"
    out.unlink(missing_ok=True)
    command = [sys.executable, str(REPO / "bench" / "e2e_small_reference.py"),
               "--model", str(paths["model"]), "--data", str(paths["data"]), "--out", str(out),
               "--timing", str(timing), "--steps", str(steps), "--rank", str(RANK),
               "--alpha", str(ALPHA), "--lr", str(LR), "--resolution", str(RESOLUTION)]
    started = _launch(command, env, workdir / "reference.log")
    ended = time.time()
    record = json.loads(timing.read_text())
    return {"wall_s": out.stat().st_mtime - started, "exit_s": ended - started,
            "first_step_s": record["first_step_end"] - started, "step_s": record["step_s"]}


@contextlib.contextmanager
def cpu_load(procs: int):
    """`procs` busy-looping processes for the duration of the block."""
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
               for _ in range(procs)]  # fmt: skip
    try:
        time.sleep(1.0)  # let them get going before the measured run starts
        yield
    finally:
        for burner in burners:
            burner.terminate()
        for burner in burners:
            burner.wait(timeout=30)


def base_env() -> dict:
    # Neither side is told how many threads to use, unless the sweep says so.
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return {**env, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}


def variants(args, paths: dict) -> list[tuple[str, object]]:
    env = base_env()
    if args.thread_sweep:
        return [(f"ours, {n} thread(s)",
                 lambda n=n: run_ours(paths, {**env, "OMP_NUM_THREADS": str(n)}))
                for n in (1, cores())]  # fmt: skip
    ours_env = {**env, **dict(item.split("=", 1) for item in args.ours_env)}
    return [("ours", lambda: run_ours(paths, ours_env)),
            ("reference", lambda: run_reference(paths, env, args.steps))]


def measure(args, paths: dict) -> list[dict]:
    runs = []
    for condition in ("quiet", "loaded"):
        for pair in range(args.pairs):
            for name, run in variants(args, paths):
                load = args.load_procs if condition == "loaded" else 0
                with cpu_load(load):
                    before = os.getloadavg()[0]
                    result = run()
                    after = os.getloadavg()[0]
                result |= {"runner": name, "condition": condition, "pair": pair,
                           "load_avg": [round(before, 2), round(after, 2)]}
                runs.append(result)
                print(f"{condition:6} pair {pair + 1} {name:20} "
                      f"whole job {result['wall_s']:6.1f} s, "
                      f"first step {result['first_step_s']:5.1f} s, load {before:.1f}->{after:.1f}",
                      flush=True)  # fmt: skip
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--load-procs", type=int, default=cores(),
                        help="busy-looping processes of the loaded runs (default: one per core)")
    parser.add_argument("--thread-sweep", action="store_true",
                        help="ours only: OMP_NUM_THREADS=1 against one thread per core")
    parser.add_argument("--ours-env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for our runs only (repeatable)")
    parser.add_argument("--workdir", type=Path, help="kept; default: a temporary folder")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        workdir.mkdir(parents=True, exist_ok=True)
        paths = prepare(workdir, args.steps)
        # One unmeasured run warms the page cache for the libraries and the model.
        variants(args, paths)[0][1]()
        runs = measure(args, paths)
    summary = summarise(runs, thread_sweep=args.thread_sweep)
    print_table(summary)
    import torch

    report = {"machine": {"cores": cores(), "platform": platform.platform(),
                          "python": platform.python_version(), "torch": torch.__version__},
              "job": {"steps": args.steps, "images": IMAGES, "resolution": RESOLUTION,
                      "batch": 1, "rank": RANK, "alpha": ALPHA, "lr": LR,
                      "load_procs": args.load_procs, "ours_env": args.ours_env},
              "summary": summary, "runs": runs}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    name = "e2e_small_threads.json" if args.thread_sweep else "e2e_small.json"
    (args.out / name).write_text(json.dumps(report, indent=1) + "\n")
    print(f"written: {args.out / name}")


if __name__ == "__main__":
    main()
