"""The GUI form generated from the config schema (gui/form.py): one input per
field of the right kind, and form values <-> config agreeing both ways."""

from __future__ import annotations

import sys
import tomllib
from typing import Literal, get_args, get_origin

import pytest

from core.errors import UserError
from gui.form import (
    KEYS,
    SPECS,
    config_to_values,
    make_component,
    non_default_tables,
    overrides_between,
    toml_value,
    values_to_config,
)
from gui.train_tab import KINDS, MAIN_ROWS, fields_of_kind, kind_of
from networks.algorithms import ALGORITHMS, all_options
from trainer.config import SECTIONS, TrainConfig, load_config, preset_paths


def schema_fields():
    for name, info in TrainConfig.model_fields.items():
        if name in SECTIONS:
            for field, sub in SECTIONS[name].model_fields.items():
                yield f"{name}.{field}", sub
        else:
            yield name, info


def test_every_schema_field_has_exactly_one_input():
    assert KEYS == [key for key, _ in schema_fields()]
    assert all(spec.description for spec in SPECS)


def test_input_kinds_follow_the_annotations():
    import gradio as gr

    expected = {bool: gr.Checkbox, int: gr.Number, float: gr.Number, str: gr.Textbox}
    for (key, info), spec in zip(schema_fields(), SPECS, strict=True):
        component = make_component(spec)
        assert component.label == key
        assert info.description in component.info
        if get_origin(info.annotation) is Literal:
            assert isinstance(component, gr.Dropdown)
            assert [c[1] for c in component.choices] == list(get_args(info.annotation))
        elif get_origin(info.annotation) is list:
            assert isinstance(component, gr.Textbox) and component.lines > 1
        else:
            assert isinstance(component, expected[info.annotation]), key
        if info.annotation is int:
            assert component.precision == 0


@pytest.mark.parametrize(("kind", "task", "network_type"), [
    ("lora", "train", "lora"), ("locon", "train", "locon"), ("loha", "train", "loha"),
    ("lcm_distill", "lcm_distill", "locon"),
])  # fmt: skip
def test_the_adapter_choice_sets_task_and_network_type(kind, task, network_type):
    assert fields_of_kind(kind) == (task, network_type)
    assert kind_of(task, network_type) == kind
    load_config(None, [f"task={task}", f"network.type={network_type}"])  # valid choices
    assert kind in [value for _, value in KINDS]


def test_the_train_tab_main_fields_are_schema_keys():
    assert {key for row in MAIN_ROWS for key in row} <= set(KEYS)


@pytest.mark.parametrize("preset", sorted(preset_paths()))
def test_values_round_trip_to_the_same_config(preset):
    config = load_config(preset_paths()[preset])
    assert values_to_config(config_to_values(config)) == config


@pytest.mark.parametrize("preset", sorted(preset_paths()))
def test_overrides_on_a_base_give_the_form_config(preset):
    """Two routes agree: the job's `base + --set` and the validated form."""
    base = load_config(preset_paths()[preset])
    values = config_to_values(base)
    for key, value in {"train.steps": 7, "sample.prompts": "a\nb \"quoted\"", "network.type":
                       "loha", "output.name": "1.5", "model.path": "demo"}.items():
        values[KEYS.index(key)] = value
    for name, option in all_options().items():  # a LoKr preset's factor does not apply to loha
        if name not in ALGORITHMS["loha"].option_names:
            values[KEYS.index(f"network.{name}")] = option.default
    config = values_to_config(values)
    overrides = overrides_between(base, config)
    assert load_config(preset_paths()[preset], overrides) == config
    assert "train.steps=7" in overrides and 'sample.prompts=["a", "b \\"quoted\\""]' in overrides
    assert "model.path=demo" in overrides or base.model.path == "demo"


def test_a_saved_preset_holds_only_what_differs_and_loads_back(tmp_path):
    import tomli_w

    config = load_config(preset_paths()["cpu-demo"])
    tables = non_default_tables(config)
    assert "lcm" not in tables and tables["train"]["steps"] == 30
    path = tmp_path / "mine.toml"
    path.write_text(tomli_w.dumps(tables))
    assert load_config(path) == config


@pytest.mark.parametrize("text", ['a "b" \\ c', "true", "1.5", "#x", "tab\there", "ünï", "x\x7f",
                                  "", "[1]", "{name}"])
def test_toml_values_read_back_exactly(text):
    config = load_config(None, [f"output.title={toml_value(text)}"])
    assert config.output.title == text
    assert tomllib.loads(f"v = {toml_value([text])}")["v"] == [text]


def test_problems_name_the_setting_without_cli_syntax():
    values = config_to_values(TrainConfig())
    values[KEYS.index("train.steps")] = -1
    values[KEYS.index("network.type")] = "oft"
    values[KEYS.index("dataset.resolution")] = 100
    with pytest.raises(UserError) as caught:
        values_to_config(values)
    message = str(caught.value)
    assert message.startswith("3 problems in the config:")
    assert ("network.type = \"oft\" is not allowed; choose one of: lora, locon, loha, "
            "lokr") in message
    assert "train.steps = -1 is out of range; it must be at least 0" in message
    assert "--set" not in message


def test_an_empty_number_box_is_named():
    values = config_to_values(TrainConfig())
    values[KEYS.index("train.batch_size")] = None
    with pytest.raises(UserError, match=r"train.batch_size is empty; enter a number \(default 1\)"):
        values_to_config(values)


def test_the_form_module_does_not_import_torch():
    import subprocess

    code = "import sys, gui.app; print('torch' in sys.modules, 'diffusers' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "False False"
