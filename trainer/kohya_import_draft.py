"""The preset being built by `import-kohya`: values set, options left out and why.

Every kohya option the importer reads ends in exactly one place: a value of the
preset (with the kohya option it came from), the list of options not mapped
(with the reason), the options equal to this trainer's defaults, or the ones
kohya itself would not use. Nothing is dropped without a line saying so.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from trainer.config_schema import PATH_KEYS
from trainer.kohya_import_tables import SECRET_WORDS

_SECRET = re.compile(rf"(?:^|_)(?:{'|'.join(SECRET_WORDS)})(?:$|_)", re.IGNORECASE)


@dataclass(frozen=True)
class Value:
    value: Any
    source: str  # the kohya option(s) as written, e.g. 'network_dim = 32'
    names: tuple[str, ...]  # the kohya names it came from


@dataclass
class Draft:
    values: dict[str, Value] = field(default_factory=dict)  # "section.key" -> Value
    unmapped: list[tuple[str, str]] = field(default_factory=list)  # (option as written, why)
    warnings: list[str] = field(default_factory=list)
    unused_by_kohya: list[str] = field(default_factory=list)  # set, but kohya ignores them too
    prefix: str = ""  # "dataset config " while reading a dataset config
    base: str = "."  # the kohya config's folder: where its relative files are looked for

    def set(self, key: str, value: Any, *names: str, shown: str | None = None) -> None:
        """`key` = `value`, from kohya option(s) `names` (as written: `shown`)."""
        source = shown if shown is not None else ", ".join(
            f"{self.prefix}{n}" for n in names)
        self.values[key] = Value(value, source, tuple(names))

    def set_from(self, key: str, value: Any, name: str, raw: Any) -> None:
        # A text kept as it is (a path) is not repeated in the comment.
        same = isinstance(raw, str) and value == raw and key in PATH_KEYS
        self.set(key, value, name, shown=None if same else f"{self.prefix}{name} = "
                 f"{show(name, raw)}")

    def skip(self, name: str, raw: Any, reason: str) -> None:
        self.unmapped.append((f"{self.prefix}{name} = {show(name, raw)}", reason))

    def warn(self, text: str) -> None:
        if text not in self.warnings:
            self.warnings.append(text)


def show(name: str, value: Any) -> str:
    """A kohya value as a short line of text; secrets are never shown."""
    if _SECRET.search(name):
        return "(hidden)"
    if isinstance(value, bool):
        return str(value).lower()
    text = json.dumps(value, ensure_ascii=False) if isinstance(value, str | list | dict) \
        else str(value)
    text = " ".join(text.split())  # one line: a comment cannot hold a newline
    return text if len(text) <= 100 else text[:97] + "..."


def unset(value: Any) -> bool:
    """kohya's "not given": the GUI writes "" or null for an empty field."""
    return value is None or (isinstance(value, str) and not value.strip())


def inactive(value: Any) -> bool:
    """Off or empty: an option without an equivalent loses nothing at this value."""
    if unset(value) or value is False or value == [] or value == {}:
        return True
    if isinstance(value, int | float) and not isinstance(value, bool) and value == 0:
        return True
    return isinstance(value, str) and value.strip().lower() in ("none", "false", "0", "0.0")


def flag(value: Any) -> bool:
    """A kohya boolean: true/false, or the "True"/"False" strings of network_args."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value != 0
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off", "", "none"):
        return False
    raise ValueError(f"{value!r} is not true or false")


def number(value: Any, kind: type) -> int | float:
    """An int or float from a kohya value, which the GUI may store as text."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number")
    result = float(str(value).strip()) if isinstance(value, str) else float(value)
    if kind is int:
        if not result.is_integer():
            raise ValueError(f"{value!r} is not a whole number")
        return int(result)
    return result
