"""Caption processing, one test per option, and the per-folder tag frequency table."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from core.errors import UserError
from datasets_tools import CaptionOptions, CaptionProcessor, scan_dataset, tag_frequency
from tests.datasets_helpers import save_image

CAPTION = "  sks, cat, sitting, indoors, window  "


def run(options: CaptionOptions, caption: str = CAPTION, seed: int = 0) -> str:
    return CaptionProcessor(options)(caption, random.Random(seed))


def test_no_options_passes_the_caption_through() -> None:
    assert run(CaptionOptions()) == "sks, cat, sitting, indoors, window"
    assert not CaptionProcessor().is_random


def test_prefix_and_suffix() -> None:
    options = CaptionOptions(prefix="ohwx", suffix="high quality")
    assert run(options, "cat, sitting") == "ohwx, cat, sitting, high quality"
    assert run(options, "") == "ohwx, high quality"


def test_shuffle_keeps_the_first_keep_tokens_in_place() -> None:
    options = CaptionOptions(shuffle_tags=True, keep_tokens=2)
    outputs = {run(options, seed=s) for s in range(40)}
    assert len(outputs) > 5  # it really shuffles
    for out in outputs:
        tags = out.split(", ")
        assert tags[:2] == ["sks", "cat"]
        assert sorted(tags[2:]) == ["indoors", "sitting", "window"]
    assert run(options, seed=3) == run(options, seed=3)  # same stream, same text
    assert CaptionProcessor(options).is_random


def test_shuffle_never_moves_the_prefix() -> None:
    options = CaptionOptions(prefix="ohwx", shuffle_tags=True)
    assert all(run(options, seed=s).startswith("ohwx, ") for s in range(20))


def test_caption_dropout_empties_the_whole_caption_at_the_given_rate() -> None:
    assert run(CaptionOptions(caption_dropout=1.0, prefix="ohwx")) == ""
    options = CaptionOptions(caption_dropout=0.25)
    dropped = sum(run(options, seed=s) == "" for s in range(2000))
    assert 400 <= dropped <= 600


def test_tag_dropout_drops_only_unkept_tags_at_the_given_rate() -> None:
    assert run(CaptionOptions(tag_dropout=1.0, keep_tokens=1, prefix="p")) == "p, sks"
    options = CaptionOptions(tag_dropout=0.3, keep_tokens=1)
    kept = Counter()
    for s in range(1000):
        tags = run(options, seed=s).split(", ")
        assert tags[0] == "sks"
        kept.update(tags[1:])
    assert all(620 <= kept[t] <= 780 for t in ("cat", "sitting", "indoors", "window"))
    assert not CaptionOptions(tag_dropout=0.3).shuffle_tags  # order kept without shuffle
    assert run(CaptionOptions(tag_dropout=0.0001), seed=1) == "sks, cat, sitting, indoors, window"


def test_custom_separator() -> None:
    options = CaptionOptions(separator="|", keep_tokens=1, tag_dropout=1.0, suffix="s")
    assert run(options, "a | b | c") == "a| s"


@pytest.mark.parametrize("kwargs", [{"caption_dropout": 1.5}, {"tag_dropout": -0.1},
                                    {"keep_tokens": -1}, {"separator": " "}])
def test_invalid_options_are_user_errors(kwargs) -> None:
    with pytest.raises(UserError):
        CaptionOptions(**kwargs)


def test_tag_frequency_per_dataset_folder(tmp_path: Path) -> None:
    save_image(tmp_path / "10_cat" / "a.png", seed=1, caption="cat, sitting, cat")
    save_image(tmp_path / "10_cat" / "sub" / "b.png", seed=2, caption="cat, indoors")
    save_image(tmp_path / "style" / "c.png", seed=3, caption="painting, cat")
    save_image(tmp_path / "style" / "d.png", seed=4)  # no caption: counts its class token
    table = tag_frequency(scan_dataset(tmp_path).items)
    assert table == {
        "10_cat": {"cat": 2, "indoors": 1, "sitting": 1},  # once per image, subfolders included
        "style": {"cat": 1, "painting": 1, "style": 1},
    }
