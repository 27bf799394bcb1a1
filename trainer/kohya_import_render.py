"""The preset text of an `import-kohya` draft, checked against the schema.

A value the schema refuses (a kohya value out of our range, a combination our
rules forbid) is taken out of the preset and listed with the schema's reason,
until what is left validates: the written preset always loads.
"""

from __future__ import annotations

import re
import textwrap
import tomllib
from dataclasses import dataclass
from pathlib import Path

import tomli_w
from pydantic import ValidationError

from trainer.config_schema import SECTIONS, TrainConfig
from trainer.kohya_import import Source, check_paths, import_config
from trainer.kohya_import_draft import Draft

_SECTION_KEY = re.compile(rf"\b((?:{'|'.join(SECTIONS)})\.\w+)")
_REQUIRED = {"model.path": "required: your SD1.5 checkpoint (.safetensors) or diffusers folder",
             "dataset.path": "required: your folder of images with captions"}
_WIDTH = 96


@dataclass(frozen=True)
class Preset:
    text: str
    draft: Draft
    sources: list[Source]
    written: int  # settings written (not counting those equal to our defaults)


def build_preset(path: Path, dataset_config: Path | None = None) -> Preset:
    draft, sources = import_config(path, dataset_config)
    check_paths(draft)
    for _ in range(len(draft.values) + 1):
        try:
            TrainConfig.model_validate(_nested(draft, with_defaults=True))
            break
        except ValidationError as error:
            _drop_refused(error, draft)
    text, written = render(draft, sources)
    TrainConfig.model_validate(tomllib.loads(text))  # the text itself, as load_config reads it
    return Preset(text, draft, sources, written)


def _defaults() -> dict:
    return TrainConfig().model_dump()


def _nested(draft: Draft, with_defaults: bool) -> dict:
    defaults, data = _defaults(), {}
    for key, entry in draft.values.items():
        section, name = key.split(".")
        if with_defaults or entry.value != defaults[section][name] or key in _REQUIRED:
            data.setdefault(section, {})[name] = entry.value
    return data


def _drop_refused(error: ValidationError, draft: Draft) -> None:
    dropped = False
    for problem in error.errors():
        loc, message = problem["loc"], problem["msg"].removeprefix("Value error, ")
        keys = [f"{loc[0]}.{loc[1]}"] if len(loc) >= 2 and loc[0] in SECTIONS else \
            _SECTION_KEY.findall(message)
        for key in dict.fromkeys(keys):
            entry = draft.values.pop(key, None)
            if entry is not None:
                shown = f"{key} = {_toml_value(entry.value)}"
                draft.unmapped.append((entry.source, f"not accepted here ({shown}): {message}"))
                dropped = True
    if not dropped:  # a rule on values the importer did not set: a bug, not the user's
        raise RuntimeError(f"import-kohya wrote a preset that does not validate: {error}")


def _toml_value(value) -> str:
    return tomli_w.dumps({"v": value}).removeprefix("v = ").strip()


def render(draft: Draft, sources: list[Source]) -> tuple[str, int]:
    lines = ["# Imported by `python -m trainer import-kohya` from"]
    lines += [f"#   {source.kind}: {source.path}" for source in sources]
    lines += ["# Each setting says which kohya option it came from. Check the paths and the",
              "# list below, then: python -m trainer train THIS_FILE.toml"]
    _listing(lines, f"Not mapped ({len(draft.unmapped)}): the preset does not do these",
             [f"{what}: {why}" for what, why in draft.unmapped])
    _listing(lines, f"Warnings ({len(draft.warnings)})", draft.warnings)
    data = _nested(draft, with_defaults=False)
    same = [entry.source for key, entry in draft.values.items()
            if key.split(".")[1] not in data.get(key.split(".")[0], {})]
    _listing(lines, "Same as this trainer's defaults, so not written", same)
    _listing(lines, "Given, but kohya does not use them either", draft.unused_by_kohya)
    written = 0
    for section, model in SECTIONS.items():
        table = data.get(section, {})
        required = [k for k in _REQUIRED if k.startswith(section + ".")]
        if not table and not required:
            continue
        lines += ["", f"[{section}]"]
        for name in model.model_fields:
            key = f"{section}.{name}"
            if name in table:
                written += 1
                lines += _setting(name, table[name], draft.values[key].source)
            elif key in _REQUIRED:
                lines.append(f'{name} = ""  # {_REQUIRED[key]} (the kohya config gives none)')
    return "\n".join(lines) + "\n", written


def _listing(lines: list[str], title: str, items: list[str]) -> None:
    if not items:
        return
    lines += ["#", f"# {title}:"]
    for item in items:
        wrapped = textwrap.wrap(item, _WIDTH - 6, break_on_hyphens=False,
                                break_long_words=False) or [""]
        lines.append(f"#   - {wrapped[0]}")
        lines += [f"#     {more}" for more in wrapped[1:]]


def _setting(name: str, value, source: str) -> list[str]:
    text = tomli_w.dumps({name: value}).rstrip("\n")
    if "\n" in text:  # a multi-line array: the comment goes above it
        return [f"# {source}", text]
    return [f"{text}  # {source}"]
