"""Reading and writing training configs: TOML files, `--set` overrides, presets.

Every problem is reported as one `UserError` naming where it came from (the
file, or the `--set` that gave the value), the key as `section.key` and what to
do; pydantic's own messages never reach users.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Sequence
from difflib import get_close_matches
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import tomli_w
from pydantic import ValidationError
from pydantic.fields import FieldInfo

from trainer.config_schema import DEMO, PATH_KEYS, SECTIONS, TrainConfig
from trainer.errors import UserError
from trainer.preview_decoder import check_decoder_folder

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"
_DEMO_KEYS = ("model.path", "dataset.path")

# kohya sd-scripts names that its users will type -> ours (with the value where
# the meaning maps onto a choice). Used only for "did you mean" suggestions.
KOHYA_ALIASES = {
    "pretrained_model_name_or_path": "model.path", "train_data_dir": "dataset.path",
    "enable_bucket": "dataset.buckets", "bucket_no_upscale": "dataset.no_upscale",
    "min_bucket_reso": "dataset.min_bucket", "max_bucket_reso": "dataset.max_bucket",
    "bucket_reso_steps": "dataset.bucket_step", "shuffle_caption": "dataset.shuffle_captions",
    "caption_dropout_rate": "dataset.caption_dropout", "flip_aug": "dataset.flip",
    "caption_tag_dropout_rate": "dataset.tag_dropout",
    "cache_latents_to_disk": 'dataset.cache_latents = "disk"',
    "network_module": "network.type", "algo": "network.type", "network_dim": "network.rank",
    "network_alpha": "network.alpha", "conv_dim": "network.conv_rank",
    "use_tucker": "network.tucker", "network_dropout": "network.dropout",
    "network_weights": "network.resume_from",
    "network_train_unet_only": "network.train_text_encoder = false",
    "network_train_text_encoder_only": "network.train_unet = false",
    "network_args": "the separate keys network.type, network.conv_rank, network.conv_alpha",
    "max_train_steps": "train.steps", "max_train_epochs": "train.epochs",
    "train_batch_size": "train.batch_size", "gradient_accumulation_steps": "train.grad_accum",
    "learning_rate": "train.unet_lr", "lr": "train.unet_lr",
    "optimizer_type": "train.optimizer", "lr_scheduler": "train.scheduler",
    "lr_warmup_steps": "train.warmup_steps", "save_state": "train.save_state_every_n_steps",
    "xformers": 'train.attention = "xformers"', "sdpa": 'train.attention = "sdpa"',
    "sample_prompts": "sample.prompts", "sample_every_n_steps": "sample.every_n_steps",
    "sample_sampler": "sample.sampler",
    "output_dir": "output.dir", "output_name": "output.name",
    "save_every_n_epochs": "output.save_every_n_steps", "metadata_title": "output.title",
    "metadata_author": "output.author", "metadata_description": "output.description",
    "training_comment": "output.description",
}
KOHYA_SECTIONS = {
    "model_arguments": "model",
    "dataset_arguments": "dataset",
    "additional_network_arguments": "network",
    "training_arguments": "train",
    "optimizer_arguments": "train",
    "sample_prompt_arguments": "sample",
    "saving_arguments": "output",
}


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a TOML config, apply `section.key=value` overrides and validate.

    Relative paths in the file are taken relative to the file's folder, those
    in overrides (and defaults) relative to the current directory; the result
    holds absolute paths, so it means the same wherever it is written out.
    """
    label = str(path) if path is not None else "--set options"
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_toml(Path(path))
        _absolute_paths(data, Path(os.path.abspath(path)).parent)
    origins: dict[str, str] = {}  # "section.key" -> the override that set it
    problems = [p for text in overrides if (p := _apply_override(data, text, origins))]
    problems += _unknown_keys(data, lambda key: _origin(key, origins, label))
    if problems:
        raise _user_error(problems)
    try:
        config = TrainConfig.model_validate(data)
    except ValidationError as error:
        # A value is blamed on the override that set it, else on the file; a
        # section's cross-field rule (loc = the section) on the file, as the
        # message names the keys involved.
        raise _user_error(
            [_describe(e, origins.get(_dotted(e["loc"][:2]), label)) for e in error.errors()]
        ) from None
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        setattr(getattr(config, section), name, _absolute(key, value, Path.cwd()))
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
    """Check the paths training needs. Separate from validation because the
    GUI loads presets, which leave model.path and dataset.path to the user."""
    problems = []
    for key, what in (
        ("model.path", "your SD1.5 checkpoint (.safetensors) or diffusers folder"),
        ("dataset.path", "your folder of images (with caption files)"),
    ):
        value = getattr(config, key.split(".")[0]).path
        if not value:
            problems.append(f"{key} is empty: set {key} to {what} (in the TOML file or "
                            f"with --set {key}=PATH).")
        elif value != DEMO and not Path(value).exists():
            problems.append(f"{key} = {_show(value)} does not exist; set {key} to {what}.")
    for key, value in (("network.resume_from", config.network.resume_from),
                       ("sample.lcm_lora", config.sample.lcm_lora)):
        if value and not Path(value).is_file():
            problems.append(f"{key} = {_show(value)} is not a file; fix the path or set "
                            f'{key} = "" to turn it off.')
    if config.sample.preview_decoder:
        try:  # the same checks `python -m trainer sample --preview-decoder` makes
            check_decoder_folder(config.sample.preview_decoder, "sample.preview_decoder")
        except UserError as problem:
            problems.append(str(problem))
    if problems:
        raise _user_error(problems)


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
    if not value or (value == DEMO and key in _DEMO_KEYS):
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
    origins[key] = f"--set {text}"
    section, _, name = key.rpartition(".")
    field = _field(section, name) if section else TrainConfig.model_fields.get(name)
    value = _parse_value(raw.strip(), field)
    if not section:
        data[name] = value
        return None
    table = data.setdefault(section, {})
    if not isinstance(table, dict):
        return f"--set {text}: {section} is not a section in the file ({section} = {table!r})."
    table[name] = value
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


def _origin(key: str, origins: dict[str, str], label: str) -> str:
    """The override that set `key` (or, for a section, a key in it), else `label`."""
    inside = [text for k, text in origins.items() if k == key or k.startswith(key + ".")]
    return inside[0] if inside else label


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


def _describe(error: dict, origin: str) -> str:
    """One pydantic error as `origin: key = value <what is wrong>`."""
    loc, kind, value = error["loc"], error["type"], error.get("input")
    key = _dotted(loc)
    if len(loc) == 1 and loc[0] in SECTIONS:
        if kind == "value_error":  # a section's own cross-field rule
            return f"{origin}: {error['ctx']['error']}."
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
