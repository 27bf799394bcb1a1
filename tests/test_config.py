"""The training config: schema, TOML loading with overrides, messages, presets."""

from __future__ import annotations

import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from core.errors import UserError
from trainer.config import (
    SECTIONS,
    TrainConfig,
    load_config,
    preset_paths,
)

PRESETS = preset_paths()


def load_text(tmp_path: Path, text: str, overrides=()) -> TrainConfig:
    path = tmp_path / "cfg.toml"
    path.write_text(text)
    return load_config(path, overrides)


# --- errors: one table, one checker -----------------------------------------
# (TOML text or None for no file, overrides, message; "{file}" is the TOML's
# path, "*" matches anything and a trailing "..." means "starts with").
ERROR_CASES = {
    "unknown key, near miss": (
        "[train]\nlerning_rate = 1e-4", (),
        "{file}: unknown key train.lerning_rate; did you mean train.unet_lr?"),
    "kohya name in another section": (
        "[train]\nnetwork_dim = 32", (),
        "{file}: unknown key train.network_dim; did you mean network.rank?"),
    "kohya name at top level": (
        "max_train_steps = 100", (),
        "{file}: unknown key max_train_steps; did you mean train.steps?"),
    "kohya flag that is a value here": (
        "[network]\nnetwork_train_unet_only = true", (),
        "{file}: unknown key network.network_train_unet_only; "
        "did you mean network.train_text_encoder = false?"),
    "kohya's regularization folder": (
        "[dataset]\nreg_data_dir = \"reg\"", (),
        "{file}: unknown key dataset.reg_data_dir; did you mean dataset.reg_path?"),
    "kohya's fp8 base flag": (
        "[model]\nfp8_base = true", (),
        "{file}: unknown key model.fp8_base; did you mean model.base_precision = \"fp8\"?"),
    "field of another section": (
        "[model]\nseed = 1", (),
        "{file}: unknown key model.seed; did you mean train.seed?"),
    "unknown key, no suggestion": (
        "[train]\nzzzz = 1", (),
        "{file}: unknown key train.zzzz; the keys of [train] are steps, epochs, batch_size..."),
    "unknown section": (
        "[trian]\nsteps = 3", (), "{file}: unknown section [trian]; did you mean [train]?"),
    "kohya section": (
        "[training_arguments]\nmax_train_steps = 3", (),
        "{file}: unknown section [training_arguments]; did you mean [train]?"),
    "unknown section, no suggestion": (
        "[zzzz]\na = 1", (),
        "{file}: unknown section [zzzz]; the sections are [model], [dataset], [network], "
        "[train], [sample], [output], [lcm]."),
    "bad choice": (
        '[train]\noptimizer = "adam"', (),
        '{file}: train.optimizer = "adam" is not allowed; choose one of: '
        "adamw, adamw8bit, prodigy, lion, sgd."),
    "bad top-level choice": (
        'task = "distill"', (),
        '{file}: task = "distill" is not allowed; choose one of: train, lcm_distill.'),
    "out of range, multiple of": (
        "[dataset]\nresolution = 500", (),
        "{file}: dataset.resolution = 500 is out of range; "
        "it must be between 64 and 2048 and a multiple of 64."),
    "out of range, open bound": (
        "[network]\ndropout = 1.5", (),
        "{file}: network.dropout = 1.5 is out of range; it must be at least 0 and below 1."),
    "wrong type": (
        '[train]\nsteps = "many"', (),
        '{file}: train.steps = "many" should be a whole number.'),
    "not finite": (
        "[train]\nunet_lr = inf", (), "{file}: train.unet_lr = inf should be a finite number."),
    "list item type": (
        "[sample]\nprompts = [1]", (),
        '{file}: sample.prompts[0] = 1 should be text in double quotes, e.g. "x".'),
    "section given as a value": (
        'model = "x.safetensors"', (),
        '{file}: model must be a [model] section, not "x.safetensors".'),
    "steps and epochs both 0": (
        "[train]\nsteps = 0", (),
        "{file}: train.steps = 0 and train.epochs = 0: set exactly one of them above 0 "
        "(the other to 0)."),
    "steps and epochs both set": (
        "[train]\nsteps = 100\nepochs = 2", (),
        "{file}: train.steps = 100 and train.epochs = 2: set exactly one of them above 0 "
        "(the other to 0)."),
    "buckets do not fit": (
        "[dataset]\nresolution = 128", (),
        "{file}: dataset.min_bucket (256) <= dataset.resolution (128) <= dataset.max_bucket "
        "(1024) does not hold; change one of them, or set dataset.buckets = false."),
    "sampling without prompts": (
        "[sample]\nevery_n_steps = 10", (),
        "{file}: sample.every_n_steps = 10 but sample.prompts is empty; "
        "add a prompt or set sample.every_n_steps = 0."),
    "unsafe output name": (
        '[output]\nname = "a/b"', (),
        '{file}: output.name = "a/b" is not a safe file name...'),
    "nothing to train": (
        "[network]\ntrain_unet = false\ntrain_text_encoder = false", (),
        "{file}: network.train_unet and network.train_text_encoder are both false..."),
    "several problems": (
        '[train]\noptimizer = "adam"\nbatch_size = 0', (),
        "2 problems in the config: (1) {file}: train.batch_size = 0 is out of range; "
        'it must be at least 1. (2) {file}: train.optimizer = "adam" is not allowed...'),
    "TOML syntax error": (
        "[train]\nsteps = = 3", (),
        "{file}: TOML syntax error: *(at line 2, column 9)."),
    "override without =": (
        None, ("foo",),
        "--set foo: expected section.key=value, e.g. --set train.steps=500 "
        "or --set model.path=/models/sd15.safetensors."),
    "override of an unknown key": (
        None, ("train.lerning_rate=1e-4",),
        "--set train.lerning_rate=1e-4: unknown key train.lerning_rate; "
        "did you mean train.unet_lr?"),
    "override of an unknown section": (
        "", ("trian.steps=3",),
        "--set trian.steps=3: unknown section [trian]; did you mean [train]?"),
    "override with a bad value": (
        "[train]\nsteps = 5", ("train.steps=abc",),
        '--set train.steps=abc: train.steps = "abc" should be a whole number.'),
    # A section's cross-field rule names the sources of the keys it names.
    "rule broken by an override and the file": (
        "[train]\nsteps = 100", ("train.epochs=2",),
        "--set train.epochs=2 and {file}: train.steps = 100 and train.epochs = 2: set exactly "
        "one of them above 0 (the other to 0)."),
    "rule broken by an override alone": (
        "[train]\nsteps = 5", ("dataset.resolution=128",),
        "--set dataset.resolution=128: dataset.min_bucket (256) <= dataset.resolution (128) "
        "<= dataset.max_bucket (1024) does not hold; change one of them, or set "
        "dataset.buckets = false."),
    "rule broken by two overrides": (
        "", ("network.train_unet=false", "network.train_text_encoder=false"),
        "--set network.train_unet=false and --set network.train_text_encoder=false: "
        "network.train_unet and network.train_text_encoder are both false..."),
    "rule of one key given with --set": (
        '[output]\nname = "ok"', ("output.name=a/b",),
        '--set output.name=a/b: output.name = "a/b" is not a safe file name...'),
    "rule broken by the file, overrides elsewhere": (
        "[lcm]\nw_min = 20.0", ("train.steps=3",),
        "{file}: lcm.w_min (20.0) is above lcm.w_max (15.0)."),
    "list item given with --set": (
        '[sample]\nprompts = ["a"]', ("sample.prompts=[\"b\", 2]",),
        '--set sample.prompts=["b", 2]: sample.prompts[1] = 2 should be text in double '
        'quotes, e.g. "x".'),
    "list item in the file": (
        "[sample]\nprompts = [1]", ("sample.steps=3",),
        '{file}: sample.prompts[0] = 1 should be text in double quotes, e.g. "x".'),
    "whole section given with --set, bad item": (
        "[sample]\nsteps = 3", ("sample={prompts=[1]}",),
        '--set sample={prompts=[1]}: sample.prompts[0] = 1 should be text in double quotes, '
        'e.g. "x".'),
    "whole section given with --set, unknown key": (
        "[train]\nsteps = 3", ("train={lerning_rate=1}",),
        "--set train={lerning_rate=1}: unknown key train.lerning_rate; "
        "did you mean train.unet_lr?"),
    "whole section given with --set as a value, then a key in it": (
        "[model]\npath = \"x\"", ("model=5", "model.path=y"),
        "--set model.path=y: model is not a section (model = 5, from --set model=5)."),
}


@pytest.mark.parametrize("text, overrides, expected", ERROR_CASES.values(), ids=ERROR_CASES)
def test_error_messages(tmp_path, text, overrides, expected):
    path = tmp_path / "cfg.toml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(UserError) as raised:
        load_config(path if text is not None else None, overrides)
    check_message(str(raised.value), expected.replace("{file}", str(path)))


def check_message(message: str, expected: str) -> None:
    assert "\n" not in message and "pydantic" not in message.lower()
    if expected.endswith("..."):
        expected = expected[:-3] + "*"
    pattern = ".*".join(re.escape(part) for part in expected.split("*"))
    assert re.fullmatch(pattern, message), message


def test_message_names_the_file_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "x.toml").write_text("[train]\nlerning_rate = 1e-4\n")
    with pytest.raises(UserError) as raised:
        load_config("presets/x.toml")
    check_message(str(raised.value),
                  "presets/x.toml: unknown key train.lerning_rate; did you mean train.unet_lr?")


@pytest.mark.parametrize("name, expected", [
    ("missing.toml", "config file missing.toml not found."),
    ("cpu-demo.toml", f"config file cpu-demo.toml not found; the bundled preset is "
                      f"{PRESETS['cpu-demo']}."),
    (".", "config file . is a folder, not a TOML file."),
])
def test_missing_file(tmp_path, monkeypatch, name, expected):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as raised:
        load_config(name)
    check_message(str(raised.value), expected)


# --- overrides ---------------------------------------------------------------
OVERRIDE_CASES = [
    ("train.steps=3", "train.steps", 3),
    (" train.steps = 5 ", "train.steps", 5),
    ("train.unet_lr=1e-4", "train.unet_lr", 1e-4),
    ("network.train_unet=false", "network.train_unet", False),
    ("train.optimizer=lion", "train.optimizer", "lion"),
    ('output.title="two words"', "output.title", "two words"),
    ("output.title=", "output.title", ""),
    ("output.name=1.5", "output.name", "1.5"),
    ('sample.prompts=["a", "b"]', "sample.prompts", ["a", "b"]),
    ("sample.prompts=a cat", "sample.prompts", ["a cat"]),
    ("task=lcm_distill", "task", "lcm_distill"),
    ("model.path=/x/y", "model.path", "/x/y"),
    ("model.path=demo", "model.path", "demo"),
]


@pytest.mark.parametrize("override, key, expected", OVERRIDE_CASES)
def test_override_values(override, key, expected):
    value = load_config(None, [override])
    for part in key.split("."):
        value = getattr(value, part)
    assert value == expected and type(value) is type(expected)


def test_override_replaces_file_value(tmp_path):
    config = load_text(tmp_path, "[network]\nrank = 8\n", ["network.rank=4"])
    assert config.network.rank == 4


def test_epochs_replace_default_steps():
    # As in kohya: giving epochs alone means "train for epochs".
    config = load_config(None, ["train.epochs=3"])
    assert (config.train.steps, config.train.epochs) == (0, 3)


# --- schema ------------------------------------------------------------------
def test_network_types_are_the_registry():
    from networks.registry import ALGORITHMS

    choices = typing.get_args(SECTIONS["network"].model_fields["type"].annotation)
    assert set(choices) == set(ALGORITHMS)


def test_schema_imports_without_torch():
    # The GUI builds its form from the schema before any model is loaded.
    code = "import sys, trainer.config; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


def test_every_field_has_help_text():
    models = [TrainConfig, *SECTIONS.values()]
    for model in models:
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"


def test_to_spec_carries_every_setting():
    from networks.base import Dropout

    config = load_config(None, [
        "network.type=loha", "network.rank=6", "network.alpha=3", "network.conv_rank=5",
        "network.conv_alpha=2", "network.tucker=true", "network.dropout=0.1",
        "network.rank_dropout=0.2", "network.module_dropout=0.3",
        "network.train_text_encoder=false",
    ])
    spec = config.network.to_spec()
    assert (spec.algorithm, spec.rank, spec.alpha, spec.conv_rank, spec.conv_alpha) == (
        "loha", 6, 3.0, 5, 2.0)
    assert spec.tucker and spec.train_unet and not spec.train_text_encoder
    assert spec.dropout == Dropout(neuron=0.1, rank=0.2, module=0.3)


def test_a_rule_across_sections_names_the_sources_of_its_keys(tmp_path, monkeypatch):
    """A config-wide rule (pydantic reports it at no location) names where the
    keys it mentions were set, as a section's own rules do."""
    import pydantic

    import trainer.config_io as config_io

    class WithRule(TrainConfig):
        @pydantic.model_validator(mode="after")
        def _rule(self):
            if self.train.batch_size > 3 and self.dataset.resolution > 256:
                raise ValueError(f"train.batch_size = {self.train.batch_size} is too large for "
                                 f"dataset.resolution = {self.dataset.resolution}")
            return self

    monkeypatch.setattr(config_io, "TrainConfig", WithRule)
    path = tmp_path / "cfg.toml"
    path.write_text("[dataset]\nresolution = 512\n")
    with pytest.raises(UserError) as raised:
        load_config(path, ["train.batch_size=4"])
    assert str(raised.value) == (
        f"--set train.batch_size=4 and {path}: train.batch_size = 4 is too large for "
        "dataset.resolution = 512.")
