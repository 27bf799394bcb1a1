"""kohya's sample settings for `import-kohya`: the prompts (a prompt file, or
the GUI's own text box) become sample.prompts in the same `--n --w --h --s
--l --d` syntax (trainer/prompt_options.py); an option this trainer lacks is
taken out of its prompt and listed.

sd-scripts reads .txt prompt files (one prompt a line, `#` lines skipped) and
.json / .toml ones (a list of {prompt, negative_prompt, width, height,
sample_steps, scale, seed}; TOML as [prompt] defaults plus [[prompt.subset]]).
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

from trainer.kohya_import_draft import Draft, number, unset
from trainer.kohya_import_tables import SAMPLERS
from trainer.prompt_options import LETTERS, SYNTAX, PromptOptionError, parse_prompt

_OPTION_START = re.compile(r"\s+--(?=[A-Za-z])")  # kohya splits a prompt line at " --"
# kohya's prompt-file keys -> our option letters.
_FILE_KEYS = {"negative_prompt": "n", "width": "w", "height": "h", "sample_steps": "s",
              "scale": "l", "seed": "d"}
_PROMPT_FILES = (".txt", ".json", ".toml")


def sample(args: dict, draft: Draft) -> None:
    raw = args.pop("sample_prompts", None)
    every = args.pop("sample_every_n_steps", None)
    sampler = args.pop("sample_sampler", None)
    prompts = [] if unset(raw) else read_prompts(str(raw), draft)
    if prompts:
        draft.set("sample.prompts", prompts, "sample_prompts",
                  shown=f"sample_prompts ({len(prompts)} read from {_label(str(raw))})")
    if not unset(every) and every not in (0, "0"):
        if prompts:
            try:
                draft.set_from("sample.every_n_steps", number(every, int),
                               "sample_every_n_steps", every)
            except ValueError as exc:
                draft.skip("sample_every_n_steps", every, f"value not supported: {exc}")
        else:
            draft.skip("sample_every_n_steps", every, "no sample prompt could be read, and "
                       "sampling needs one: add sample.prompts, then set sample.every_n_steps")
    if not unset(sampler):
        name = str(sampler).strip().lower()
        if name in SAMPLERS:
            draft.set_from("sample.sampler", SAMPLERS[name], "sample_sampler", sampler)
        else:
            draft.skip("sample_sampler", sampler, "a sampler this trainer does not have (it "
                       "has euler_a and ddim); the preset keeps euler_a")


def _label(raw: str) -> str:
    return raw if _looks_like_file(raw) else "the GUI's prompt box"


def _looks_like_file(raw: str) -> bool:
    return "\n" not in raw and raw.strip().lower().endswith(_PROMPT_FILES)


def read_prompts(raw: str, draft: Draft) -> list[str]:
    """The prompts of a kohya prompt file, or of the GUI's text (one a line)."""
    path = Path(raw.strip()).expanduser()
    if not path.is_absolute() and not path.exists():
        path = Path(draft.base) / path  # kohya: relative to where it ran; else beside the config
    if _looks_like_file(raw):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8"
            draft.skip("sample_prompts", raw, f"the prompt file cannot be read here ({why}): "
                       "copy its prompts into sample.prompts")
            return []
        try:
            lines = _file_lines(path, text)
        except ValueError as exc:
            draft.skip("sample_prompts", raw, f"not a kohya prompt file: {exc}")
            return []
    else:
        lines = raw.splitlines()
    prompts = []
    for number_, line in enumerate(lines, 1):
        line = line.strip()
        if line and not line.startswith("#"):
            prompt = convert_line(line, number_, draft)
            if prompt is not None:
                prompts.append(prompt)
    return prompts


def _file_lines(path: Path, text: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return text.splitlines()
    try:
        if suffix == ".json":
            entries = json.loads(text)
        else:
            table = tomllib.loads(text).get("prompt", {})
            shared = {k: v for k, v in table.items() if k != "subset"}
            entries = [{**shared, **subset} for subset in table.get("subset", [])]
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(str(exc)) from None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ValueError("expected a list of prompts with a \"prompt\" each")
    return [_entry_line(entry) for entry in entries]


def _entry_line(entry: dict) -> str:
    """One prompt-file entry as a prompt line; keys we lack become options
    that `convert_line` then lists (e.g. --sample_sampler)."""
    parts = [str(entry.get("prompt", "")).replace("\n", " ")]
    for key, value in entry.items():
        if key != "prompt":
            parts.append(f"--{_FILE_KEYS.get(key, key)} {value}")
    return " ".join(parts)


def convert_line(line: str, index: int, draft: Draft) -> str | None:
    """A kohya prompt line in our syntax, without the options we lack (each
    listed); None when the prompt itself cannot be used (listed too)."""
    text, *options = _OPTION_START.split(" " + line)
    kept = [text.strip()]
    for option in options:
        letter = option.split(maxsplit=1)[0].lower()
        if letter in LETTERS:
            try:  # one bad value costs that option, not the prompt
                parse_prompt(f"x --{option.strip()}")
                kept.append(f"--{option.strip()}")
            except PromptOptionError as exc:
                draft.skip(f"sample prompt {index} option", f"--{option.strip()}",
                           f"{exc.reason}; the prompt is kept without it")
        else:
            draft.skip(f"sample prompt {index} option", f"--{option.strip()}",
                       f"not a per-prompt option here ({SYNTAX}); the prompt is kept without it")
    prompt = " ".join(kept)
    try:
        parse_prompt(prompt)
    except PromptOptionError as exc:
        draft.skip(f"sample prompt {index}", line, f"left out: {exc.reason}")
        return None
    return prompt
