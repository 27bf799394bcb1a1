"""Command line: `python -m trainer <command> ...`.

Each subcommand is a small function taking the parsed arguments. A
`UserError` becomes one line on stderr and exit status 2 (like argparse's
own usage errors); anything else is a bug and keeps its traceback. Ctrl-C
before training began (imports, model loading) is one line and exit status
130, as shells report SIGINT; SIGTERM then is 143 (__main__ dies of it).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from core.cli_verbs import add_verbs
from core.errors import UserError

# The LoRA tools that need a base model or a config, one module each (core.cli_verbs).
TOOL_VERBS: tuple[str, ...] = (
    "trainer.merge_into_cli",
    "trainer.import_kohya_cli",
    "trainer.extract_cli",
)


def _make_demo_model(args: argparse.Namespace) -> None:
    from trainer.demo_model import make_demo_model

    paths = make_demo_model(args.dir, seed=args.seed)
    print(f"diffusers folder: {paths['diffusers']}")
    print(f"single-file checkpoint: {paths['single_file']}")


NOTHING_TRAINED = "interrupted before the first training step: nothing was trained, nothing changed"


def _train(args: argparse.Namespace) -> int | None:
    # Until the first step, Ctrl-C raises (trainer/stop_flag.py) and the run
    # has left its folder as it was; during training it stops at a step.
    try:
        from trainer.config import load_config, require_paths
        from trainer.oom_retry import run_with_retry, set_arguments

        config = load_config(args.config, args.set)
        require_paths(config)
        # train.oom_retry: out of memory in a step retries with less memory (trainer/oom_retry.py)
        result = run_with_retry(config, resume=args.resume, stop_at_step=args.stop_at_step)
    except KeyboardInterrupt as interrupt:
        print(NOTHING_TRAINED, file=sys.stderr)
        return 128 + getattr(interrupt, "signum", signal.SIGINT)
    if not result.is_main:
        return None
    if result.stopped_early:
        chosen = f" {set_arguments(result.oom_retries)}" if result.oom_retries else ""
        print(f"stopped after step {result.steps_done}; the state is saved: continue with "
              f"--resume{chosen}")
    else:
        print(f"done: {result.steps_done} steps, adapter written to {result.final_file}")
    return None


def _sample(args: argparse.Namespace) -> None:
    from trainer.sample_cli import run_sample

    run_sample(args)


def _estimate(args: argparse.Namespace) -> None:
    import json

    from trainer.config import load_config
    from trainer.estimate import estimate, to_text

    result = estimate(load_config(args.config, args.set), device=args.device)
    print(json.dumps(result.to_json(), indent=1) if args.json else to_text(result))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "make-demo-model",
        help="write a tiny random SD1.5-shaped model (diffusers folder + single file)",
        description="Write DIR/diffusers/ and DIR/demo-sd15.safetensors: a tiny model with "
        "SD1.5's module names, random weights from --seed. Same seed, same bytes.",
    )
    demo.add_argument("dir", metavar="DIR", help="output folder (created if missing)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.set_defaults(handler=_make_demo_model)

    train = commands.add_parser(
        "train",
        help="train an adapter from a TOML config or preset",
        description="Train a LoRA/LoCon/LoHa adapter. Ctrl-C or SIGTERM stops cleanly at the "
        "next step, saving the state; --resume continues from the newest saved state.",
    )
    train.add_argument("config", metavar="CONFIG.toml", help="a config file or a preset")
    train.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one setting, e.g. --set train.steps=500 (repeatable)",
    )  # fmt: skip
    train.add_argument("--resume", action="store_true", help="continue from the saved state")
    train.add_argument(
        "--stop-at-step", type=int, metavar="N",
        help="stop after step N as if interrupted (state saved), to split a long run",
    )  # fmt: skip
    train.set_defaults(handler=_train)

    from trainer.sample_cli import add_sample_arguments

    sample = commands.add_parser(
        "sample",
        help="generate one image with LoRAs (and an LCM-LoRA) merged into the model",
        description="Merge each --lora (and --lcm-lora) into the model's weights, W' = W + "
        "weight * scale * delta W, then sample one PNG. With --lcm-lora: LCM scheduler, "
        "4 steps, guidance 1.0 by default; otherwise euler_a, 20 steps, guidance 7.0.",
    )
    add_sample_arguments(sample)
    sample.set_defaults(handler=_sample)

    estimate = commands.add_parser(
        "estimate",
        help="the expected peak memory of a training run, before it starts",
        description="Estimate the peak memory of training CONFIG.toml, part by part (weights "
        "by precision, adapter, optimizer, activations, caches), against the memory available "
        "on the device, with what to change when it does not fit. Loads no weights.",
    )
    estimate.add_argument("config", metavar="CONFIG.toml", help="a config file or a preset")
    estimate.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one setting, e.g. --set train.batch_size=4 (repeatable)",
    )  # fmt: skip
    estimate.add_argument("--device", choices=("cpu", "cuda"), default=None,
                          help="estimate for this device (default: where training would run)")
    estimate.add_argument("--json", action="store_true", help="print JSON (for the GUI)")
    estimate.set_defaults(handler=_estimate)
    add_verbs(commands, TOOL_VERBS)
    return parser


def _quiet_libraries() -> None:
    # This tool never downloads, and the libraries' progress bars and
    # optional-dependency notices (torchvision) are noise on a CLI.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        _quiet_libraries()
        return args.handler(args) or 0
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
