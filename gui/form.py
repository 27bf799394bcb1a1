"""The training form, generated from the config schema: the one typed schema
the CLI, the presets and the form all read, so the form is never kept in
sync by hand.

Each schema field becomes one input, keyed `section.key`: a Literal a
dropdown, a bool a checkbox, a number a number box, a list of texts a
multi-line box (one item per line), other text a text box; the label is the
key as the CLI and TOML files know it, the help text the field's description.
Values go back through `load_config` as `--set` overrides, so the page shows
the same validation messages as the CLI.
"""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from core.errors import UserError
from trainer.config import SECTIONS, TrainConfig, load_config
from trainer.config import require_paths as check_paths
from trainer.config_io import without_sources


@dataclass(frozen=True)
class FieldSpec:
    key: str  # "section.key", or "task" at the top level
    kind: Literal["choice", "bool", "int", "float", "text", "lines"]
    default: Any
    description: str
    choices: tuple[str, ...] = ()

    @property
    def section(self) -> str:
        return self.key.split(".")[0] if "." in self.key else ""


def field_specs() -> list[FieldSpec]:
    """Every setting of the schema, in schema order, the top-level ones first."""
    specs = []
    defaults = TrainConfig()
    for name, info in TrainConfig.model_fields.items():
        if name not in SECTIONS:
            specs.append(_spec(name, info.annotation, getattr(defaults, name), info.description))
    for section, model in SECTIONS.items():
        values = getattr(defaults, section)
        for name, info in model.model_fields.items():
            specs.append(_spec(f"{section}.{name}", info.annotation, getattr(values, name),
                               info.description))
    return specs


def _spec(key: str, annotation: Any, default: Any, description: str | None) -> FieldSpec:
    text = description or ""
    if get_origin(annotation) is Literal:
        return FieldSpec(key, "choice", default, text, tuple(get_args(annotation)))
    if get_origin(annotation) is list:
        return FieldSpec(key, "lines", default, text + " One per line.")
    kinds = {bool: "bool", int: "int", float: "float", str: "text"}
    if annotation not in kinds:
        raise TypeError(f"the GUI has no input for {key}: {annotation}")
    return FieldSpec(key, kinds[annotation], default, text)


SPECS = field_specs()
KEYS = [spec.key for spec in SPECS]
_BY_KEY = {spec.key: spec for spec in SPECS}


def make_component(spec: FieldSpec):
    """An unrendered Gradio input for one field; the tab decides where it goes."""
    import gradio as gr

    common = dict(label=spec.key, info=spec.description, render=False,
                  elem_id="cfg-" + spec.key.replace(".", "-"))  # fmt: skip
    if spec.kind == "choice":
        return gr.Dropdown(choices=list(spec.choices), value=spec.default, **common)
    if spec.kind == "bool":
        return gr.Checkbox(value=spec.default, **common)
    if spec.kind in ("int", "float"):
        return gr.Number(value=spec.default, precision=0 if spec.kind == "int" else None,
                         **common)
    if spec.kind == "lines":
        return gr.Textbox(value="\n".join(spec.default), lines=3, **common)
    return gr.Textbox(value=spec.default, **common)


# --- values <-> config -------------------------------------------------------
def config_to_values(config: TrainConfig) -> list[Any]:
    """The inputs' values for a config, in KEYS order."""
    data = config.model_dump()
    values = []
    for spec in SPECS:
        value = data[spec.key] if not spec.section else data[spec.section][spec.key.split(".")[1]]
        values.append("\n".join(value) if spec.kind == "lines" else value)
    return values


def values_to_config(values: Sequence[Any], base: Path | None = None,
                     require_paths: bool = False) -> TrainConfig:
    """Validate the inputs' values (on top of `base`, a TOML file) into a config;
    with `require_paths`, also the files a run reads (trainer.config.require_paths).

    Raises UserError with every problem, each naming its key."""
    overrides, problems = [], []
    for spec, value in zip(SPECS, values, strict=True):
        parsed = _parse(spec, value)
        if parsed is None:
            problems.append(f"{spec.key} is empty; enter a number (default {spec.default}).")
        else:
            overrides.append(f"{spec.key}={toml_value(parsed)}")
    if problems:
        raise UserError(" ".join(problems))
    try:
        config = load_config(base, overrides)
        if require_paths:
            check_paths(config)
        return config
    except UserError as error:
        # load_config names the `--set` that gave each bad value; in the page
        # the key at the start of the rest of the sentence says it better.
        raise UserError(without_sources(str(error), overrides)) from None


def overrides_between(base: TrainConfig, config: TrainConfig) -> list[str]:
    """The `section.key=value` overrides that turn `base` into `config`."""
    base_values, values = config_to_values(base), config_to_values(config)
    return [f"{spec.key}={toml_value(_parse(spec, new))}"
            for spec, old, new in zip(SPECS, base_values, values, strict=True) if old != new]


def non_default_tables(config: TrainConfig) -> dict[str, Any]:
    """Only what differs from the schema defaults, as TOML tables (a small preset)."""
    defaults, data = TrainConfig().model_dump(), config.model_dump()
    tables: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            changed = {k: v for k, v in value.items() if v != defaults[key][k]}
            if changed:
                tables[key] = changed
        elif value != defaults[key]:
            tables[key] = value
    return tables


def _parse(spec: FieldSpec, value: Any) -> Any:
    if spec.kind == "lines":
        return [line.strip() for line in str(value or "").splitlines() if line.strip()]
    if spec.kind == "bool":
        return bool(value)
    if spec.kind in ("int", "float"):
        if value is None or value == "":
            return None
        number = float(value)
        # A whole number stays whole so that an int field validates.
        return int(number) if spec.kind == "int" and number.is_integer() else number
    return "" if value is None else str(value).strip()


def toml_value(value: Any, bare: bool = True) -> str:
    """One value in the syntax `--set` reads: TOML, lists kept on one line,
    and text bare where `--set` would read it back unchanged (model.path=demo
    reads better than model.path="demo" in the command shown to users)."""
    import tomli_w

    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item, bare=False) for item in value) + "]"
    if bare and isinstance(value, str) and _reads_back_bare(value):
        return value
    return tomli_w.dumps({"v": value})[len("v = "):].strip()


def _reads_back_bare(text: str) -> bool:
    # config_io._parse_value takes the raw text when it is not TOML, or when
    # it is TOML for something other than text (true, 1.5) in a text field.
    if text != text.strip() or "\n" in text or "\r" in text:
        return False
    try:
        return not isinstance(tomllib.loads(f"v = {text}")["v"], str)
    except tomllib.TOMLDecodeError:
        return True
