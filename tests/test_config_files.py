"""Config files: paths relative to the TOML, writing and reading back, the
bundled presets, and which paths a run requires."""

from __future__ import annotations

import os
import tomllib

import pytest

from core.errors import UserError
from trainer.config import (
    PATH_KEYS,
    SECTIONS,
    TrainConfig,
    config_to_toml,
    load_config,
    output_dir,
    preset_paths,
    require_paths,
)
from trainer.config_io import without_sources

PRESETS = preset_paths()


# --- paths -------------------------------------------------------------------
def test_relative_paths_follow_the_toml_folder(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "run.toml").write_text(
        '[model]\npath = "../models/m.safetensors"\n[dataset]\npath = "demo"\n'
        '[network]\nresume_from = "~/old.safetensors"\n[sample]\nlcm_lora = "lcm.safetensors"\n'
        '[output]\ndir = "out/{name}"\nname = "x"\n'
    )
    monkeypatch.chdir(tmp_path)
    config = load_config("configs/run.toml", ["sample.lcm_lora=here.safetensors"])
    assert config.model.path == str(tmp_path / "models" / "m.safetensors")
    assert config.dataset.path == "demo"
    assert config.network.resume_from == os.path.expanduser("~/old.safetensors")
    assert config.sample.lcm_lora == str(tmp_path / "here.safetensors")  # overrides: the cwd
    assert config.output.dir == str(folder / "out" / "{name}")
    assert output_dir(config) == folder / "out" / "x"


def test_default_paths_follow_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(None)
    assert output_dir(config) == tmp_path / "outputs" / "my-lora"
    assert config.model.path == "" and config.network.resume_from == ""


# --- writing -----------------------------------------------------------------
def round_trip_configs():
    yield "defaults", load_config(None)  # absolute paths: the same wherever written
    for name, path in PRESETS.items():
        yield name, load_config(path)
    yield "customised", load_config(None, [
        "sample.prompts=[\"a cat\", 'quote \" inside']", "sample.every_n_steps=5",
        "train.epochs=4", "train.unet_lr=3e-5", "output.title=ünïcode", "model.path=m.ckpt",
    ])


@pytest.mark.parametrize("name, config", list(round_trip_configs()))
def test_config_to_toml_round_trips(tmp_path, name, config):
    path = tmp_path / "elsewhere" / "config.toml"
    path.parent.mkdir()
    path.write_text(config_to_toml(config), encoding="utf-8")
    assert load_config(path) == config
    assert set(tomllib.loads(config_to_toml(config))) == {"task", *SECTIONS}


# --- presets -----------------------------------------------------------------
EXPECTED_PRESETS = {"sd15-character-lora", "sd15-style-lora", "sd15-locon", "sd15-loha",
                    "sd15-lokr", "low-vram", "cpu-demo", "sd15-lcm-distill", "demo-learns"}


def test_bundled_presets():
    assert set(PRESETS) == EXPECTED_PRESETS


@pytest.mark.parametrize("name", sorted(EXPECTED_PRESETS))
def test_preset_sets_only_what_differs(name):
    path = PRESETS[name]
    load_config(path)  # unknown keys and bad values raise
    defaults = TrainConfig().model_dump()
    for section, table in tomllib.loads(path.read_text()).items():
        items = table.items() if isinstance(table, dict) else [(None, table)]
        for key, value in items:
            full = f"{section}.{key}" if key else section
            default = defaults[section][key] if key else defaults[section]
            # model.path / dataset.path stay visible as "" to show what to fill in.
            assert value != default or full in PATH_KEYS, f"{name}: {full} is the default"
    for line in path.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            assert "#" in line, f"{name}: no comment on {line!r}"


def test_cpu_demo_preset():
    config = load_config(PRESETS["cpu-demo"])
    require_paths(config)
    assert (config.model.path, config.dataset.path, config.dataset.resolution) == (
        "demo", "demo", 64)
    assert (config.network.rank, config.train.steps, config.train.batch_size) == (4, 30, 2)
    assert not config.network.train_text_encoder
    assert (len(config.sample.prompts), config.sample.every_n_steps, config.sample.steps) == (
        1, 15, 4)


def test_require_paths(tmp_path):
    preset = PRESETS["sd15-character-lora"]
    with pytest.raises(UserError) as raised:
        require_paths(load_config(preset))
    message = str(raised.value)
    assert message.startswith(f"2 problems in the config: (1) {preset}: model.path is empty: "
                              "set model.path to your SD1.5 checkpoint (.safetensors) or "
                              "diffusers folder (in the TOML file or with --set model.path=PATH)")
    assert f"(2) {preset}: dataset.path is empty" in message
    config = load_config(PRESETS["cpu-demo"], [f"network.resume_from={tmp_path}/none"])
    with pytest.raises(UserError, match=rf"^--set network\.resume_from={tmp_path}/none: "
                                        rf"network\.resume_from = {tmp_path}/none does not exist"):
        require_paths(config)


def test_require_paths_names_the_true_source_of_each_path(tmp_path):
    path = tmp_path / "cfg.toml"
    path.write_text('[model]\npath = "m.safetensors"\n[dataset]\npath = "imgs"\n')
    config = load_config(path, [f"dataset.path={tmp_path}/elsewhere"])
    with pytest.raises(UserError) as raised:
        require_paths(config)
    assert str(raised.value) == (
        f'2 problems in the config: (1) {path}: model.path = "{tmp_path}/m.safetensors" does '
        "not exist; set model.path to your SD1.5 checkpoint (.safetensors) or diffusers folder. "
        f'(2) --set dataset.path={tmp_path}/elsewhere: dataset.path = "{tmp_path}/elsewhere" '
        "does not exist; set dataset.path to your folder of images (with caption files).")
    # A config built without load_config has no recorded sources: no origin, same advice.
    bare = TrainConfig.model_validate({"model": {"path": "demo"}, "dataset": {"path": "/nope"}})
    with pytest.raises(UserError, match=r'^dataset\.path = "/nope" does not exist; set'):
        require_paths(bare)


def test_sources_can_be_left_out_where_every_value_is_an_override(tmp_path):
    # The GUI passes its whole form as overrides; there the key says it better.
    overrides = ["network.train_unet=false", "network.train_text_encoder=false",
                 'sample.prompts=["a: b and c"]', "train.steps=0"]
    with pytest.raises(UserError) as raised:
        load_config(None, overrides)
    assert without_sources(str(raised.value), overrides) == (
        "2 problems in the config: (1) network.train_unet and network.train_text_encoder are "
        "both false: nothing would be trained; set one of them to true. (2) train.steps = 0 "
        "and train.epochs = 0: set exactly one of them above 0 (the other to 0).")
    overrides = ["model.path=demo", f"dataset.path={tmp_path}/x"]
    with pytest.raises(UserError) as raised:
        require_paths(load_config(None, overrides))
    assert without_sources(str(raised.value), overrides) == (
        f'dataset.path = "{tmp_path}/x" does not exist; set dataset.path to your folder of '
        "images (with caption files).")
