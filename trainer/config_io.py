"""Reading and writing training configs: TOML files, `--set` overrides, presets.

Every problem is reported as one `UserError` naming where it came from (the
file, or the `--set` that gave the value), the key as `section.key` and what to
do; pydantic's own messages never reach users.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from difflib import get_close_matches
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import tomli_w
from pydantic import ValidationError
from pydantic.fields import FieldInfo

from core.errors import UserError
from networks.file_header import UnreadableFile, check_adapter_file, read_header
from trainer.config_schema import DEMO, PATH_KEYS, SECTIONS, TrainConfig
from trainer.demo_assets import DATASET_KEYWORDS, MODEL_KEYWORDS
from trainer.kohya_names import KOHYA_ALIASES, KOHYA_SECTIONS
from trainer.preview_decoder import HOW_TO_GET, check_decoder_folder

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"
_KEYWORDS = {"model.path": MODEL_KEYWORDS, "dataset.path": DATASET_KEYWORDS}  # built-ins
# Where a loaded config's values came from, kept in its __dict__ beside the
# fields: pydantic leaves such entries out of equality and dumps.
_SOURCES = "_value_sources"
_ADAPTER_FILES = (
    ("network.resume_from", "an adapter .safetensors file saved by this trainer or by kohya"),
    ("sample.lcm_lora", "an LCM-LoRA .safetensors file such as latent-consistency's "
                        "lcm-lora-sdv1-5"),
)
_SECTION_KEY = re.compile(rf"\b(?:{'|'.join(SECTIONS)})\.\w+")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a TOML config, apply `section.key=value` overrides and validate.

    Relative paths in the file are taken relative to the file's folder, those
    in overrides (and defaults) relative to the current directory; the result
    holds absolute paths, so it means the same wherever it is written out.
    """
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_toml(Path(path))
        _absolute_paths(data, Path(os.path.abspath(path)).parent)
    sources = _Sources(str(path) if path is not None else "--set options", {},
                       frozenset(_keys_in(data)))
    problems = [p for text in overrides if (p := _apply_override(data, text, sources.overrides))]
    problems += _unknown_keys(data, sources.blame)
    if problems:
        raise _user_error(problems)
    try:
        config = TrainConfig.model_validate(data)
    except ValidationError as error:
        raise _user_error([_describe(e, sources) for e in error.errors()]) from None
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        setattr(getattr(config, section), name, _absolute(key, value, Path.cwd()))
    config.__dict__[_SOURCES] = sources
    return config


def config_to_toml(config: TrainConfig) -> str:
    """Every setting, as TOML that `load_config` reads back to an equal config."""
    return tomli_w.dumps(config.model_dump())


def output_dir(config: TrainConfig) -> Path:
    """output.dir with its `{name}` placeholder filled in."""
    return Path(config.output.dir.replace("{name}", config.output.name))


def preset_paths() -> dict[str, Path]:
    """Bundled presets by name (file name without .toml)."""
    return {p.stem: p for p in sorted(PRESETS_DIR.glob("*.toml"))}


def require_paths(config: TrainConfig) -> None:
    """Check the paths training needs, and read the headers of the files it
    loads later (adapters, the preview decoder's weights), so that a wrong
    file stops the run before the model loads, not at the first preview.
    Separate from validation because the GUI loads presets, which leave
    model.path and dataset.path to the user. Torch-free: the GUI calls it."""
    found = [(key, _path_problem(config, key, what)) for key, what in (
        ("model.path", "your SD1.5 checkpoint (.safetensors) or diffusers folder"),
        ("dataset.path", "your folder of images (with caption files)"),
    )]
    for key, what in _ADAPTER_FILES:
        found.append((key, _adapter_problem(_value(config, key), key, what)))
    found.append(("sample.preview_decoder", _decoder_problem(config.sample.preview_decoder)))
    sources = config.__dict__.get(_SOURCES)
    problems = [f"{origin}: {problem}" if (origin := sources and sources.of(key)) else problem
                for key, problem in found if problem]
    if problems:
        raise _user_error(problems)


def _value(config: TrainConfig, key: str) -> str:
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


def _path_problem(config: TrainConfig, key: str, what: str) -> str | None:
    value = _value(config, key)
    if not value:
        return f"{key} is empty: set {key} to {what} (in the TOML file or with --set {key}=PATH)."
    if value != DEMO and value not in _KEYWORDS.get(key, ()) and not Path(value).exists():
        # In full: a path cut short to fit a line cannot be checked or fixed.
        shown = json.dumps(value, ensure_ascii=False)
        return f"{key} = {shown} does not exist; set {key} to {what}."
    return None


def _adapter_problem(value: str, key: str, what: str) -> str | None:
    if not value:
        return None
    try:
        check_adapter_file(value, key, f'set {key} to {what}, or to "" to turn it off')
    except UserError as problem:
        return str(problem)
    return None


def _decoder_problem(decoder: str) -> str | None:
    if not decoder:
        return None
    try:  # the same checks `python -m trainer sample --preview-decoder` makes
        folder = check_decoder_folder(decoder, "sample.preview_decoder")
        weights = folder / "diffusion_pytorch_model.safetensors"
        if weights.exists():
            read_header(weights)
    except UnreadableFile as problem:
        return (f"sample.preview_decoder = {decoder}: {problem.path.name} {problem.reason}; "
                f"{HOW_TO_GET}.")
    except UserError as problem:
        return str(problem)
    return None


def without_sources(message: str, overrides: Sequence[str]) -> str:
    """`message` without the "--set ...: " origins that name `overrides`
    (alone or joined by " and "), for a page where every value is an override
    and the key each problem names says it better."""
    labels = [f"--set {text}" for text in overrides] + ["--set options"]  # the no-file label
    one = "|".join(map(re.escape, labels))
    return re.sub(rf"(?:{one})(?: and (?:{one}))*: ", "", message)


# --- reading -------------------------------------------------------------
def _read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        hint = ""
        if path.stem in preset_paths() and path.parent == Path("."):
            hint = f"; the bundled preset is {preset_paths()[path.stem]}"
        what = "is a folder, not a TOML file" if path.is_dir() else "not found"
        raise UserError(f"config file {path} {what}{hint}.")
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except tomllib.TOMLDecodeError as error:
        # The message ends "(at line L, column C)".
        raise UserError(f"{path}: TOML syntax error: {error}.") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; save it as UTF-8.") from None


def _absolute(key: str, value: str, base: Path) -> str:
    if not value or value in _KEYWORDS.get(key, ()):
        return value
    return os.path.normpath(base / os.path.expanduser(value))


def _absolute_paths(data: dict[str, Any], base: Path) -> None:
    for key in PATH_KEYS:
        section, name = key.split(".")
        table = data.get(section)
        if isinstance(table, dict) and isinstance(table.get(name), str):
            table[name] = _absolute(key, table[name], base)


def _apply_override(data: dict[str, Any], text: str, origins: dict[str, str]) -> str | None:
    """Set one `section.key=value` in `data`; return a problem, or None."""
    key, equals, raw = text.partition("=")
    key = ".".join(part.strip() for part in key.split("."))
    if not equals or not key or "" in key.split("."):
        return (f"--set {text}: expected section.key=value, e.g. --set train.steps=500 "
                "or --set model.path=/models/sd15.safetensors.")
    section, _, name = key.rpartition(".")
    field = _field(section, name) if section else TrainConfig.model_fields.get(name)
    value = _parse_value(raw.strip(), field)
    if not section:
        data[name] = value
        origins[key] = f"--set {text}"
        return None
    table = data.setdefault(section, {})
    if not isinstance(table, dict):
        where = origins.get(section, "the file")
        return (f"--set {text}: {section} is not a section ({section} = {_show(table)}, from "
                f"{where}).")
    table[name] = value
    origins[key] = f"--set {text}"
    return None


def _parse_value(raw: str, field: FieldInfo | None) -> Any:
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word or path: `--set model.path=/x/y`
    if field is not None and field.annotation is str and not isinstance(value, str):
        value = raw  # `--set output.name=1.5` means the text "1.5"
    if field is not None and get_origin(field.annotation) is list and isinstance(value, str):
        value = [value]  # one prompt without brackets
    return value


@dataclass(frozen=True)
class _Sources:
    """Where each value of a config came from: a `--set`, the file, or a default."""

    label: str  # the file as given, or "--set options" when there is none
    overrides: dict[str, str]  # "section.key" (or a whole "section") -> "--set ..." that set it
    in_file: frozenset[str]  # the keys the file gives ("section.key", or a non-table "section")

    def of(self, key: str) -> str | None:
        """The `--set` that gave `key` (a section: a key in it), else the file
        when it gives it, else None (a default)."""
        parts = key.split(".")
        around = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}  # key, its section
        inside = key + "."
        overrides = [t for k, t in self.overrides.items() if k in around or k.startswith(inside)]
        if overrides:
            return overrides[-1]  # the last one applied is the value that counts
        if any(k in around or k.startswith(inside) for k in self.in_file):
            return self.label
        return None

    def blame(self, key: str) -> str:
        return self.of(key) or self.label

    def of_rule(self, message: str) -> str:
        """The sources of the keys a cross-field rule's message names."""
        named = [s for s in dict.fromkeys(map(self.of, _SECTION_KEY.findall(message))) if s]
        named.sort(key=lambda s: s == self.label)  # the `--set`s first, then the file
        return " and ".join(named) or self.label


def _keys_in(data: dict[str, Any]) -> set[str]:
    keys = set()
    for key, value in data.items():
        keys.update([f"{key}.{name}" for name in value] if isinstance(value, dict) else [key])
    return keys


def _field(section: str, name: str) -> FieldInfo | None:
    model = SECTIONS.get(section)
    return model.model_fields.get(name) if model else None


# --- messages ------------------------------------------------------------
def _unknown_keys(data: dict[str, Any], origin) -> list[str]:
    problems = []
    for key, value in data.items():
        if key in SECTIONS and isinstance(value, dict):
            fields = SECTIONS[key].model_fields
            for name in value:
                if name not in fields:
                    full = f"{key}.{name}"
                    hint = _suggest(key, name) or f"the keys of [{key}] are {', '.join(fields)}"
                    problems.append(f"{origin(full)}: unknown key {full}; {hint}")
        elif key in SECTIONS or key in TrainConfig.model_fields:
            continue  # a section given as a value: validation says so
        elif isinstance(value, dict):
            guess = KOHYA_SECTIONS.get(key) or next(
                iter(get_close_matches(key, list(SECTIONS), n=1, cutoff=0.6)), None
            )
            hint = (f"did you mean [{guess}]?" if guess else
                    "the sections are " + ", ".join(f"[{s}]" for s in SECTIONS))
            problems.append(f"{origin(key)}: unknown section [{key}]; {hint}")
        else:
            hint = _suggest(None, key) or "the top level holds task and the sections"
            problems.append(f"{origin(key)}: unknown key {key}; {hint}")
    return problems


def _suggest(section: str | None, name: str) -> str | None:
    """The nearest valid key: own section first, then kohya names, then others."""
    pool = {"task": "task"}
    for other, model in SECTIONS.items():
        for field in model.model_fields:
            pool.setdefault(field, f"{other}.{field}")
    pool.update(KOHYA_ALIASES)
    if section in SECTIONS:
        pool.update({field: f"{section}.{field}" for field in SECTIONS[section].model_fields})
    match = get_close_matches(name, list(pool), n=1, cutoff=0.6)
    return f"did you mean {pool[match[0]]}?" if match else None


def _dotted(loc: tuple) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)[1:]


def _describe(error: dict, sources: _Sources) -> str:
    """One pydantic error as `origin: key = value <what is wrong>`, `origin`
    being the `--set` that gave the value, else the file."""
    loc, kind, value = error["loc"], error["type"], error.get("input")
    key = _dotted(loc)
    origin = sources.blame(_dotted(loc[:2]))  # an item of a list: the list's source
    if not loc and kind == "value_error":  # a rule across sections: the keys it names
        return f"{sources.of_rule(str(error['ctx']['error']))}: {error['ctx']['error']}."
    if len(loc) == 1 and loc[0] in SECTIONS:
        if kind == "value_error":  # a section's cross-field rule: the keys its message names
            return f"{sources.of_rule(str(error['ctx']['error']))}: {error['ctx']['error']}."
        return f"{origin}: {key} must be a [{key}] section, not {_show(value)}."
    field = _field(*loc[:2]) if len(loc) > 1 else TrainConfig.model_fields[loc[0]]
    if field is None or kind == "extra_forbidden":
        return f"{origin}: unknown key {key}."
    if kind == "literal_error":
        choices = ", ".join(get_args(field.annotation))
        return f"{origin}: {key} = {_show(value)} is not allowed; choose one of: {choices}."
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal",
                "multiple_of"):
        return f"{origin}: {key} = {_show(value)} is out of range; it must be {_bounds(field)}."
    if kind == "string_too_long":
        limit = error["ctx"]["max_length"]
        return f"{origin}: {key} is too long; use at most {limit} characters."
    annotation = str if len(loc) > 2 else field.annotation  # an item of a list[str]
    return f"{origin}: {key} = {_show(value)} should be {_kind(annotation)}."


def _bounds(field: FieldInfo) -> str:
    limits = {name: getattr(m, name) for m in field.metadata
              for name in ("ge", "gt", "le", "lt", "multiple_of") if hasattr(m, name)}
    if "ge" in limits and "le" in limits:
        parts = [f"between {limits['ge']} and {limits['le']}"]
    else:
        words = {"ge": "at least", "gt": "above", "le": "at most", "lt": "below"}
        parts = [f"{words[name]} {limits[name]}" for name in words if name in limits]
    if "multiple_of" in limits:
        parts.append(f"a multiple of {limits['multiple_of']}")
    return " and ".join(parts)


def _kind(annotation: Any) -> str:
    if get_origin(annotation) is Literal:
        return "one of: " + ", ".join(get_args(annotation))
    if get_origin(annotation) is list:
        return 'a list of texts, e.g. ["a", "b"]'
    return {int: "a whole number", float: "a finite number", bool: "true or false",
            str: 'text in double quotes, e.g. "x"'}.get(annotation, str(annotation))


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str | list):
        text = json.dumps(value, ensure_ascii=False, default=str)
    else:
        text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _user_error(problems: list[str]) -> UserError:
    problems = [p if p[-1] in ".?!" else p + "." for p in problems]
    if len(problems) == 1:
        return UserError(problems[0])
    numbered = " ".join(f"({i}) {p}" for i, p in enumerate(problems, 1))
    return UserError(f"{len(problems)} problems in the config: {numbered}")
