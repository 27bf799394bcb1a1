"""Per-sample caption processing (trigger word, shuffle, dropout) and tag statistics.

Randomness comes only from the `random.Random` passed in, so the trainer can
derive it from (seed, epoch, batch, slot) and replay any step exactly.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from core.errors import UserError

from .scan import ImageItem


@dataclass(frozen=True)
class CaptionOptions:
    prefix: str = ""  # e.g. the trigger word; never shuffled or dropped by tag dropout
    suffix: str = ""
    shuffle_tags: bool = False  # shuffle comma-separated tags after the first keep_tokens
    keep_tokens: int = 0  # leading tags that stay in place and are never dropped
    caption_dropout: float = 0.0  # probability the whole caption (prefix too) becomes ""
    tag_dropout: float = 0.0  # probability each tag after keep_tokens is left out
    separator: str = ","

    def __post_init__(self) -> None:
        for name in ("caption_dropout", "tag_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise UserError(f"Caption option {name} is {value}; use a value from 0 to 1.")
        if self.keep_tokens < 0:
            raise UserError(f"keep_tokens is {self.keep_tokens}; use 0 or more.")
        if not self.separator.strip():
            raise UserError("The tag separator must contain a visible character such as ','.")


def split_tags(caption: str, separator: str = ",") -> list[str]:
    return [tag.strip() for tag in caption.split(separator) if tag.strip()]


class CaptionProcessor:
    """Turn a stored caption into the text for one training sample."""

    def __init__(self, options: CaptionOptions | None = None) -> None:
        self.options = options or CaptionOptions()
        self._joiner = f"{self.options.separator.strip()} "

    @property
    def is_random(self) -> bool:
        """False when every call gives the same text (text embeddings can then be cached)."""
        o = self.options
        return o.shuffle_tags or o.caption_dropout > 0 or o.tag_dropout > 0

    def __call__(self, caption: str, rng: random.Random) -> str:
        o = self.options
        # Whole-caption dropout trains the unconditional case, so it drops the
        # trigger word too, as in kohya's caption_dropout_rate.
        if o.caption_dropout > 0 and rng.random() < o.caption_dropout:
            return ""
        body = caption.strip()
        if o.shuffle_tags or o.tag_dropout > 0:
            tags = split_tags(body, o.separator)
            kept, rest = tags[: o.keep_tokens], tags[o.keep_tokens:]
            if o.tag_dropout > 0:
                rest = [tag for tag in rest if rng.random() >= o.tag_dropout]
            if o.shuffle_tags:
                rng.shuffle(rest)
            body = self._joiner.join(kept + rest)
        parts = [part for part in (o.prefix.strip(), body, o.suffix.strip()) if part]
        return self._joiner.join(parts)


def tag_frequency(
    items: Iterable[ImageItem], separator: str = ","
) -> dict[str, dict[str, int]]:
    """{dataset folder: {tag: number of images whose caption has it}}.

    The shape of kohya's `ss_tag_frequency` metadata; counted once per image
    (not per repeat), from the stored captions before any processing.
    """
    table: dict[str, Counter[str]] = {}
    for item in items:
        counter = table.setdefault(item.folder, Counter())
        counter.update(set(split_tags(item.caption, separator)))
    return {folder: dict(sorted(counts.items())) for folder, counts in sorted(table.items())}
