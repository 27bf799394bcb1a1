"""`python -m trainer import-kohya FILE --out PRESET.toml`: a kohya config as a preset.

FILE is a kohya_ss GUI JSON ("Save config"), an sd-scripts training TOML
(`--config_file`) or an sd-scripts dataset config TOML; `--dataset-config`
adds the dataset config to a training config. The summary lists what was not
mapped and why (the preset's top comments say the same); the last line is
`wrote: PATH`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from core.errors import UserError

COMMAND = "import-kohya"
HELP = "turn a kohya_ss / sd-scripts config into a preset of this trainer"
DESCRIPTION = (
    "Read a kohya_ss GUI JSON config, an sd-scripts training TOML and/or an sd-scripts "
    "dataset config TOML and write one preset TOML of this trainer. Every kohya option is "
    "mapped (the preset's line names it) or listed, in the output and at the top of the "
    "preset, with why it is not. Paths are kept as written; a missing one is a warning.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE",
                        help="kohya_ss GUI .json, sd-scripts training .toml or dataset .toml")
    parser.add_argument("--out", required=True, metavar="PRESET.toml",
                        help="the preset to write (refused if it exists, unless --force)")
    parser.add_argument("--dataset-config", metavar="DATASET.toml", default=None,
                        help="an sd-scripts dataset config ([[datasets]], [[datasets.subsets]])")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --out")


def run(args: argparse.Namespace) -> int:
    from core.atomic import atomic_write_text
    from trainer.config import load_config
    from trainer.kohya_import_render import build_preset

    source = Path(args.file)
    dataset = Path(args.dataset_config) if args.dataset_config else None
    out = _check_out(Path(args.out), [source] + ([dataset] if dataset else []), args.force)
    preset = build_preset(source, dataset)
    atomic_write_text(out, preset.text)
    load_config(out)  # what `train` will read: proven before saying it is written
    _summary(preset)
    print(f"wrote: {out}")
    return 0


def _check_out(out: Path, inputs: list[Path], force: bool) -> Path:
    if out.suffix.lower() != ".toml":
        raise UserError(f"--out {out}: a preset is a .toml file; give a name ending in .toml.")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name ending in .toml.")
    for path in inputs:
        if path.exists() and out.exists() and os.path.samefile(path, out):
            raise UserError(f"--out {out} is the input {path}: write the preset to another file.")
    if out.exists() and not force:
        raise UserError(f"--out {out} exists; choose another name, or add --force to "
                        "overwrite it.")
    return out


def _summary(preset) -> None:
    draft = preset.draft
    for source in preset.sources:
        print(f"read: {source.kind} {source.path}")
    print(f"mapped: {preset.written} settings written, {len(draft.values) - preset.written} "
          "equal to this trainer's defaults")
    for title, items in (("not mapped", [f"{w}: {y}" for w, y in draft.unmapped]),
                         ("warnings", draft.warnings)):
        print(f"{title} ({len(items)}):" if items else f"{title}: none")
        for item in items:
            print(f"  - {item}")
