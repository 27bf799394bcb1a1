"""Per-prompt sample options in kohya's prompt syntax, torch-free.

`a cat --n blurry --w 512 --h 768 --s 28 --l 7.5 --d 42`: the text, then
options as kohya's sd-scripts reads them from its prompt files (the line is
split at " --", letters in any case): n negative prompt, w / h size in
pixels, s denoising steps, l guidance (CFG) scale, d seed. Each overrides the
[sample] setting for that prompt alone. Unlike kohya, a bad option is an
error rather than ignored: an unknown letter, a value that is not a number, a
size that is not a multiple of 8.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

# The VAE downsamples by 8; the same bounds as the [sample] fields.
SIZE_STEP, MAX_SIZE, MAX_STEPS = 8, 4096, 1000
# Where an option starts: " --" followed by a letter (kohya splits at " --").
_OPTION_START = re.compile(r"\s+--(?=[A-Za-z])")
_OPTION = re.compile(r"([A-Za-z]+)(?:\s+(.*))?", re.DOTALL)
_WHOLE = re.compile(r"[0-9]+")
MAX_SEED = 2**63 - 1  # what torch.Generator.manual_seed takes
LETTERS = {"n": "negative prompt", "w": "width", "h": "height", "s": "steps",
           "l": "guidance scale", "d": "seed"}
SYNTAX = ("--n TEXT (negative prompt), --w PIXELS, --h PIXELS, --s STEPS, "
          "--l GUIDANCE, --d SEED")


class PromptOptionError(ValueError):
    """A prompt whose options cannot be used: `reason` says why, the message
    names the prompt too (callers that name it their own way use `reason`)."""

    def __init__(self, line: str, reason: str) -> None:
        super().__init__(f'prompt "{line}": {reason}')
        self.line = line
        self.reason = reason


@dataclass(frozen=True)
class PromptOptions:
    """One prompt line, split: None = the [sample] setting applies."""

    text: str
    negative: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None


def parse_prompt(line: str) -> PromptOptions:
    """The text and options of one prompt line; PromptOptionError for a bad one."""
    text, *options = _OPTION_START.split(" " + line)
    text = text.strip()
    if not text:
        raise PromptOptionError(line, "there are options but no text before them; write "
                                      "the prompt first, e.g. 'a cat --w 512'")
    values: dict[str, object] = {}
    for option in options:
        match = _OPTION.fullmatch(option.strip())
        letter = match[1].lower() if match else option.split()[0]
        if letter not in LETTERS:
            raise PromptOptionError(line, f"--{letter} is not an option here; use {SYNTAX}")
        value = (match[2] or "").strip()
        if not value:
            raise PromptOptionError(line, f"--{letter} ({LETTERS[letter]}) needs a value")
        if letter in values:
            raise PromptOptionError(line, f"--{letter} is given twice")
        values[letter] = _value(line, letter, value)
    return PromptOptions(text, values.get("n"), values.get("w"), values.get("h"),
                         values.get("s"), values.get("l"), values.get("d"))


def _value(line: str, letter: str, value: str) -> object:
    if letter == "n":
        return value
    what = f"--{letter} {value}"
    if letter == "l":
        try:
            scale = float(value)
        except ValueError:
            raise PromptOptionError(
                line, f"{what}: the guidance scale must be a number such as 7.5") from None
        if not (math.isfinite(scale) and scale >= 0):
            raise PromptOptionError(line, f"{what}: the guidance scale must be a number >= 0")
        return scale
    if not _WHOLE.fullmatch(value):
        raise PromptOptionError(line, f"{what}: the {LETTERS[letter]} must be a whole number")
    number = int(value)
    if letter == "d" and number > MAX_SEED:
        raise PromptOptionError(line, f"{what}: the seed must be at most {MAX_SEED}")
    if letter in "wh" and not (SIZE_STEP <= number <= MAX_SIZE and number % SIZE_STEP == 0):
        raise PromptOptionError(line, f"{what}: the {LETTERS[letter]} must be a multiple of "
                                      f"{SIZE_STEP} (the VAE's factor) from {SIZE_STEP} to "
                                      f"{MAX_SIZE}")
    if letter == "s" and not 1 <= number <= MAX_STEPS:
        raise PromptOptionError(line, f"{what}: the steps must be from 1 to {MAX_STEPS}")
    return number
