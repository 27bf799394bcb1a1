"""Sample prompts with kohya options (`a cat --n blurry --w 512 --d 42`):
parsed by trainer/prompt_options.py, refused by the schema when bad, and
applied per prompt by the sampler (images of the asked size and seed)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from core.errors import UserError
from trainer.config import PRESETS_DIR, load_config
from trainer.prompt_options import PromptOptionError, PromptOptions, parse_prompt

PRESET = PRESETS_DIR / "cpu-demo.toml"


def config_with(prompts: list[str], **overrides):
    values = {"sample.prompts": prompts, "sample.steps": 2, **overrides}
    return load_config(PRESET, [f"{k}={json.dumps(v)}" for k, v in values.items()])


def test_the_kohya_example_parses_into_every_option() -> None:
    assert parse_prompt("a cat --n blurry --w 512 --h 768 --s 28 --l 7.5 --d 42") == \
        PromptOptions("a cat", negative="blurry", width=512, height=768, steps=28,
                      guidance=7.5, seed=42)


@pytest.mark.parametrize(("line", "expected"), [
    ("a cat", PromptOptions("a cat")),
    ("  a cat, sitting  ", PromptOptions("a cat, sitting")),
    # Letters in any case, as kohya reads them; a negative runs to the next option.
    ("a cat --N ugly, low quality --W 64", PromptOptions("a cat", negative="ugly, low quality",
                                                         width=64)),
    ("a cat --l 1", PromptOptions("a cat", guidance=1.0)),
    ("a cat --d 0", PromptOptions("a cat", seed=0)),
    ("x-ray--of a cat", PromptOptions("x-ray--of a cat")),  # no space before "--": text
])  # fmt: skip
def test_text_and_options_are_split_as_kohya_does(line, expected) -> None:
    assert parse_prompt(line) == expected


BAD = {
    "a cat --x 3": "--x is not an option here; use --n TEXT",
    "a cat --ss euler_a": "--ss is not an option here",
    "a cat --w 500": "--w 500: the width must be a multiple of 8",
    "a cat --h 0": "--h 0: the height must be a multiple of 8",
    "a cat --w 8192": "from 8 to 4096",
    "a cat --w wide": "--w wide: the width must be a whole number",
    "a cat --s 2.5": "--s 2.5: the steps must be a whole number",
    "a cat --s 0": "--s 0: the steps must be from 1 to 1000",
    "a cat --l high": "--l high: the guidance scale must be a number such as 7.5",
    "a cat --l -1": "--l -1: the guidance scale must be a number >= 0",
    "a cat --l inf": "--l inf: the guidance scale must be a number >= 0",
    "a cat --d -5": "--d -5: the seed must be a whole number",
    "a cat --d 99999999999999999999": "the seed must be at most",
    "a cat --n": "--n (negative prompt) needs a value",
    "a cat --w 64 --w 128": "--w is given twice",
    "--w 512 --h 512": "there are options but no text before them",
}


@pytest.mark.parametrize("line", BAD)
def test_a_bad_option_is_refused_naming_the_prompt(line) -> None:
    with pytest.raises(PromptOptionError) as info:
        parse_prompt(line)
    assert BAD[line] in info.value.reason
    assert str(info.value).startswith(f'prompt "{line}": ')


def test_the_config_refuses_a_bad_option_naming_the_setting_and_prompt() -> None:
    with pytest.raises(UserError) as info:
        config_with(["a photo of a cat", "a dog --w 500"])
    assert 'sample.prompts[1] "a dog --w 500": --w 500: the width must be a multiple of 8' \
        in str(info.value)
    assert config_with(["a dog --w 512 --d 3"]).sample.prompts == ["a dog --w 512 --d 3"]


def test_the_sample_cli_refuses_a_bad_option_before_loading(tmp_path, capsys) -> None:
    from trainer.cli import main

    argv = ["sample", "--model", str(tmp_path / "no-model"), "--prompt", "a cat --q 1",
            "--out", str(tmp_path / "x.png")]
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith('error: --prompt "a cat --q 1": --q is not an')


def test_each_prompt_gets_its_own_settings() -> None:
    from trainer.preview import preview_settings
    from trainer.sampling import per_prompt

    config = config_with(["plain", "big --w 128 --h 96 --s 3 --l 2.5 --n ugly --d 42"],
                         **{"sample.seed": 7, "sample.negative_prompt": "bad"})
    plain, big = per_prompt(preview_settings(config))
    assert (plain.prompts, plain.width, plain.height, plain.steps, plain.guidance,
            plain.negative_prompt, plain.seed) == (("plain",), 64, 64, 2, 7.0, "bad", 7)
    assert (big.prompts, big.width, big.height, big.steps, big.guidance,
            big.negative_prompt, big.seed) == (("big",), 128, 96, 3, 2.5, "ugly", 42)


def test_lcm_previews_refuse_more_steps_than_the_lcm_scheduler_takes() -> None:
    from trainer.sampling import SampleSettings, per_prompt

    lcm = SampleSettings(prompts=("a cat --s 51",), sampler="lcm", steps=4)
    with pytest.raises(UserError, match='prompt "a cat --s 51": --s 51: the LCM scheduler'):
        per_prompt(lcm)
    assert per_prompt(replace(lcm, prompts=("a cat --s 50",)))[0].steps == 50


@pytest.mark.usefixtures("one_torch_thread")
def test_options_reach_the_sampler_size_and_seed(demo_sd) -> None:
    """Through the trainer's own preview settings: the image has the asked size,
    and --d 42 on the second prompt draws what sample.seed = 42 draws for a
    plain first prompt (the same noise, not seed + index)."""
    from trainer.preview import preview_settings
    from trainer.sampling import generate

    config = config_with(["a red circle", "a blue square --w 96 --h 48 --d 42"])
    first, second = generate(demo_sd, preview_settings(config))
    assert first.size == (64, 64) and second.size == (96, 48)
    plain = config_with(["a blue square"], **{"sample.width": 96, "sample.height": 48,
                                              "sample.seed": 42})
    (same,) = generate(demo_sd, preview_settings(plain))
    assert np.array_equal(np.asarray(second), np.asarray(same))
    assert not np.array_equal(np.asarray(second), np.asarray(
        generate(demo_sd, preview_settings(config_with(["a blue square --w 96 --h 48"])))[0]))


@pytest.mark.usefixtures("one_torch_thread")
def test_negative_steps_and_guidance_options_match_the_settings_they_override(demo_sd) -> None:
    from trainer.preview import preview_settings
    from trainer.sampling import generate

    with_options = config_with(["a cat --n blurry --s 3 --l 2.5"])
    plain = config_with(["a cat"], **{"sample.negative_prompt": "blurry", "sample.steps": 3,
                                      "sample.guidance": 2.5})
    (a,) = generate(demo_sd, preview_settings(with_options))
    (b,) = generate(demo_sd, preview_settings(plain))
    (default,) = generate(demo_sd, preview_settings(config_with(["a cat"])))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(default))


@pytest.mark.usefixtures("one_torch_thread")
def test_the_sample_cli_applies_the_prompt_options(tmp_path, demo_model_dir, capsys) -> None:
    from trainer.cli import main

    out = tmp_path / "x.png"
    argv = ["sample", "--model", str(demo_model_dir / "diffusers"), "--prompt",
            "a red circle --w 80 --h 40 --s 2 --l 3", "--steps", "1", "--size", "64x64",
            "--out", str(out)]
    assert main(argv) == 0
    assert "(80x40, euler_a, 2 steps, guidance 3," in capsys.readouterr().out
    with Image.open(out) as image:
        assert image.size == (80, 40)
