"""Presets in the GUI: the bundled TOML files plus the user's own, saved as
small TOML files holding only what differs from the schema defaults."""

from __future__ import annotations

import tomllib
from pathlib import Path

from core.atomic import atomic_write_text
from core.errors import UserError
from core.run_layout import RunLayout
from gui.datadir import DataDirs, safe_name
from gui.form import non_default_tables
from trainer.config import TrainConfig, load_config, output_dir, preset_paths

DEMO_PRESET = "demo-learns"  # the newcomer demo: a toy model visibly learns a concept


def choices(dirs: DataDirs) -> list[tuple[str, str]]:
    """(label, path) for the dropdown: bundled presets, then the user's."""
    bundled = [(name, str(path)) for name, path in preset_paths().items()]
    mine = [(f"{path.stem} (mine)", str(path)) for path in sorted(dirs.presets.glob("*.toml"))]
    return bundled + mine


def chosen(path: str | None, dirs: DataDirs) -> Path:
    """`path` if it is one of `choices` (bundled or saved here): the page
    reads no other TOML file as a preset."""
    if not path:
        raise UserError("Choose a preset first.")
    offered = {Path(value).resolve() for _, value in choices(dirs)}
    resolved = Path(path).resolve()
    if resolved not in offered:
        raise UserError(f"{path} is not one of the presets offered here (the bundled ones and "
                        f"those saved in {dirs.presets}); choose one from the list.")
    return resolved


def base_path(preset: str | None, dirs: DataDirs) -> Path:
    """The TOML a run started from the page builds on: the chosen preset, or
    the schema defaults when none is chosen."""
    return chosen(preset, dirs) if preset else dirs.base_config


def load(path: str, dirs: DataDirs) -> TrainConfig:
    """A preset as a full config; without its own output.dir, runs go to the
    app's outputs folder (where the Export tab looks)."""
    path = str(chosen(path, dirs))
    config = load_config(path)
    with open(path, "rb") as file:
        gives_dir = "dir" in tomllib.load(file).get("output", {})
    if not gives_dir:
        config.output.dir = str(dirs.outputs / "{name}")
    return config


def save(config: TrainConfig, name: str, dirs: DataDirs) -> Path:
    import tomli_w

    name = safe_name(name, "")
    if not name:
        raise UserError("Enter a name for the preset (letters, digits, '-', '_').")
    if name in preset_paths():
        raise UserError(f"{name} is the name of a bundled preset; choose another name.")
    path = dirs.presets / f"{name}.toml"
    header = "# Saved from the GUI: only what differs from the defaults.\n"
    atomic_write_text(path, header + tomli_w.dumps(non_default_tables(config)))
    return path


def free_output_name(config: TrainConfig) -> str:
    """output.name, or name-2, name-3... so that a new run never overwrites an old one."""
    base, name, n = config.output.name, config.output.name, 1
    while holds_run(output_dir(config.model_copy(update={"output": config.output.model_copy(
            update={"name": name})}))):
        n += 1
        name = f"{base}-{n}"
    return name


def holds_run(folder: Path) -> bool:
    """A folder with an adapter or a saved training state: starting afresh there would
    overwrite work, so the GUI offers Resume or a new name instead."""
    return RunLayout(folder).holds_run()


def saved_step(folder: Path) -> int | None:
    """The step of the newest complete training state in a run folder, or None."""
    return RunLayout(folder).saved_step()
