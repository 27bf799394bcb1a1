"""A kohya config as a preset of this trainer (`python -m trainer import-kohya`).

Reads a kohya_ss GUI JSON ("Save config"), an sd-scripts training TOML
(`--config_file`, options flat or in sections) and/or an sd-scripts dataset
config TOML, and builds one preset (`trainer.kohya_import_render`) that
`trainer.config.load_config` validates. Every option is either mapped (the
preset's line names it), equal to our default, not used by kohya either, or
listed as not mapped with the reason (`trainer.kohya_import_draft`).
Torch-free.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args, get_origin

from core.errors import UserError
from trainer import kohya_import_groups as groups
from trainer import kohya_import_network as network
from trainer.config_schema import PATH_KEYS, SECTIONS
from trainer.kohya_import_dataset import (
    looks_like_dataset_config,
    map_folders,
    split_dataset_config,
    subset_options,
)
from trainer.kohya_import_draft import Draft, flag, inactive, number, unset
from trainer.kohya_import_prompts import sample
from trainer.kohya_import_tables import GUI_ONLY, HARMLESS, NO_EQUIVALENT, SAME_NAMES
from trainer.kohya_names import KOHYA_ALIASES, KOHYA_SECTIONS

_PLAIN_TARGET = re.compile(r"^(\w+)\.(\w+)$")
_VALUE_TARGET = re.compile(r'^(\w+)\.(\w+) = "?([\w.]+)"?$')  # 'dataset.cache_latents = "disk"'
# The options the dataset config gives instead, which sd-scripts then ignores.
_FOLDER_OPTIONS = ("train_data_dir", "reg_data_dir", "in_json")
_GUI_FIELDS = {"LoRA_type", "epoch", "lr_warmup", "model_list", "save_as_bool", "optimizer"}
_NETWORK_OPTIONS = ("LoRA_type", "network_module", "network_dim", "network_args")


@dataclass(frozen=True)
class Source:
    path: Path
    kind: str  # "kohya_ss GUI config" | "sd-scripts training config" | "sd-scripts dataset config"
    data: dict


def read_source(path: Path, expect_dataset: bool = False) -> Source:
    """A kohya config file; UserError naming the file (and line) when it is not one."""
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "not found"
        raise UserError(f"{path} {what}: give a kohya_ss GUI .json config or an sd-scripts "
                        ".toml config.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; save it as UTF-8.") from None
    except OSError as exc:
        raise UserError(f"{path} cannot be read ({exc.strerror}).") from None
    data, is_json = _parse(path, text)
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a kohya config: expected a JSON object of options.")
    if looks_like_dataset_config(data):
        return Source(path, "sd-scripts dataset config", data)
    if expect_dataset:
        raise UserError(f"{path} is not an sd-scripts dataset config: it has no [[datasets]] "
                        "or [general] table (--dataset-config takes that file).")
    flat = data if is_json else _flatten(data)
    _check_kohya(path, data, flat)
    # Newer kohya_ss GUIs save their config as TOML: the same flat GUI fields.
    gui = is_json or bool(set(flat) & _GUI_FIELDS)
    return Source(path, "kohya_ss GUI config" if gui else "sd-scripts training config", flat)


def _parse(path: Path, text: str) -> tuple[Any, bool]:
    is_json = path.suffix.lower() == ".json" or (
        path.suffix.lower() != ".toml" and text.lstrip().startswith("{"))
    if is_json:
        try:
            return json.loads(text), True
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not valid JSON: {exc.msg} at line {exc.lineno}, column "
                            f"{exc.colno}.") from None
    try:
        return tomllib.loads(text), False
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: TOML syntax error: {exc}.") from None


def _flatten(data: dict) -> dict:
    """sd-scripts reads a --config_file's tables as if their keys were flat."""
    flat: dict = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def known_names() -> set[str]:
    return (set(KOHYA_ALIASES) | set(SAME_NAMES) | set(NO_EQUIVALENT) | GUI_ONLY | {
        "LoRA_type", "network_args", "unet_lr", "text_encoder_lr", "epoch", "lr_warmup",
        "optimizer", "optimizer_args", "resolution", "cache_latents", "save_precision",
        "dataset_config", "sample_prompts", "network_module"})


def _check_kohya(path: Path, data: dict, flat: dict) -> None:
    ours = {k for k, v in data.items() if k in SECTIONS and isinstance(v, dict)
            and set(v) <= set(SECTIONS[k].model_fields)}
    if ours and not set(data) & set(KOHYA_SECTIONS):
        raise UserError(f"{path} is already a preset of this trainer (it has "
                        f"[{'], ['.join(sorted(ours))}]): train with it as it is.")
    if not set(flat) & known_names():
        raise UserError(f"{path} is not a kohya config: none of its keys is a kohya option "
                        "(such as pretrained_model_name_or_path, train_data_dir, network_dim).")


def import_config(path: Path, dataset_config: Path | None = None) -> tuple[Draft, list[Source]]:
    """The draft preset of a kohya config (and dataset config), and the files read."""
    source = read_source(path)
    sources, draft = [source], Draft(base=str(path.parent))
    if source.kind == "sd-scripts dataset config":
        if dataset_config is not None:
            raise UserError(f"{path} is a dataset config already; give the training config "
                            "as FILE and this one as --dataset-config.")
        apply_dataset(source.data, draft)
        return draft, sources
    args = dict(source.data)
    named = args.pop("dataset_config", None)
    if dataset_config is not None and not unset(named):
        draft.skip("dataset_config", named, f"--dataset-config {dataset_config} is read instead")
    elif not unset(named):
        candidate = Path(str(named)).expanduser()
        if not candidate.is_absolute() and not candidate.is_file():
            candidate = path.parent / candidate  # kohya: where it ran; else beside the config
        if candidate.is_file():
            dataset_config = candidate
        else:
            draft.skip("dataset_config", named, "the file is not found here: pass it with "
                       "--dataset-config")
    dataset = read_source(dataset_config, expect_dataset=True) if dataset_config else None
    if dataset is not None:
        sources.append(dataset)
        for name in _FOLDER_OPTIONS:
            if not inactive(args.get(name)):
                draft.skip(name, args[name], "ignored: the dataset config gives the folders "
                           "(sd-scripts ignores it too)")
            args.pop(name, None)
    gui = source.kind == "kohya_ss GUI config"
    args.update(_extra_arguments(args.pop("additional_parameters", None), draft))
    if not any(name in args for name in _NETWORK_OPTIONS):
        draft.unmapped.append((
            "no LoRA_type, network_module or network_dim", "a full fine-tune (DreamBooth) "
            "config: this trainer trains an adapter, so the preset trains a LoRA (network.rank "
            "16); its learning rates were chosen for full weights (often 1e-6): check "
            "train.unet_lr and train.text_encoder_lr (1e-4 and 5e-5 are usual for a LoRA)"))
    map_options(args, draft, defaults=not gui)
    if dataset is not None:
        apply_dataset(dataset.data, draft)
    return draft, sources


def _extra_arguments(raw: Any, draft: Draft) -> dict:
    """The GUI's "additional parameters": sd-scripts options on one command
    line, given after the GUI's own, so they win."""
    if unset(raw):
        return {}
    try:
        tokens = shlex.split(str(raw))
    except ValueError as exc:
        draft.skip("additional_parameters", raw, f"not a command line ({exc})")
        return {}
    found: dict[str, Any] = {}
    name = None
    for token in tokens:
        if token.startswith("--"):
            name, equals, value = token[2:].partition("=")
            found[name] = value if equals else True
        elif name is None:
            draft.skip("additional_parameters", token, "a value without an --option before it")
        elif found[name] is True:
            found[name] = token
        else:  # more values: a list, as argparse's nargs="*" (network_args)
            found[name] = [*(found[name] if isinstance(found[name], list) else [found[name]]),
                           token]
    if isinstance(found.get("network_args"), str):
        found["network_args"] = [found["network_args"]]
    return found


def apply_dataset(data: dict, draft: Draft) -> None:
    dataset_level, subsets = split_dataset_config(data, draft)
    draft.prefix = "dataset config "
    map_options(dataset_level | subset_options(subsets, draft), draft, defaults=False)
    map_folders(subsets, draft)
    draft.prefix = ""


def map_options(args: dict, draft: Draft, defaults: bool) -> None:
    """Every option of `args`: the groups first, then one by one."""
    args = dict(args)
    lora_defaults = defaults and "network_module" in args  # networks.lora's own defaults
    network.model_family(args, draft)
    network.network(args, draft)
    groups.learning_rates(args, draft, defaults)
    total_steps = groups.length(args, draft) if any(
        n in args for n in ("max_train_steps", "max_train_epochs", "epoch")) or defaults \
        else None
    groups.scheduler(args, draft, total_steps, defaults)
    groups.optimizer(args, draft, defaults)
    groups.attention(args, draft)
    groups.cache(args, draft, defaults)
    groups.precision(args, draft, defaults)
    groups.resolution(args, draft)
    groups.output_name(args, draft)
    sample(args, draft)
    if lora_defaults:
        for name, key, value in (("network_dim", "network.rank", 4),
                                 ("network_alpha", "network.alpha", 1.0)):
            if name not in args:
                draft.set(key, value, name, shown=f"kohya's default {name} = {value}")
    if defaults and "caption_extension" not in args:
        draft.set("dataset.caption_extension", ".caption", "caption_extension",
                  shown='kohya\'s default caption_extension = ".caption"')
    for name in sorted(args):
        _one_option(name, args[name], draft)


def _target(name: str) -> tuple[str, Any] | None:
    """(section.key, fixed value or None) of a kohya name, from the shared table."""
    alias = SAME_NAMES.get(name) or KOHYA_ALIASES.get(name, "")
    if match := _PLAIN_TARGET.match(alias):
        return f"{match[1]}.{match[2]}", None
    if match := _VALUE_TARGET.match(alias):
        return f"{match[1]}.{match[2]}", match[3]
    return None


def _one_option(name: str, raw: Any, draft: Draft) -> None:
    target = None if name in NO_EQUIVALENT else _target(name)
    if target is not None:
        if not unset(raw):
            _map_single(name, raw, target, draft)
        return
    if inactive(raw) or _harmless(name, raw):
        return  # off, or kohya's no-op default: nothing to lose
    if name in GUI_ONLY:
        draft.skip(name, raw, "a kohya_ss GUI setting, not a training option")
    elif name in NO_EQUIVALENT:
        draft.skip(name, raw, NO_EQUIVALENT[name])
    elif name in KOHYA_SECTIONS:
        draft.skip(name, raw, "a kohya section without options this importer reads")
    else:
        draft.skip(name, raw, "not a kohya option this importer knows")


def _harmless(name: str, raw: Any) -> bool:
    try:
        return raw in HARMLESS.get(name, ())
    except TypeError:  # a list or table: never one of the no-op values
        return False


def _map_single(name: str, raw: Any, target: tuple[str, Any], draft: Draft) -> None:
    key, fixed = target
    section, field = key.split(".")
    annotation = SECTIONS[section].model_fields[field].annotation
    try:
        if fixed is not None:  # 'cache_latents_to_disk' -> a choice, when switched on
            if flag(raw):
                draft.set_from(key, _fixed(fixed, annotation), name, raw)
            return
        value = _convert(raw, annotation)
    except ValueError as exc:
        draft.skip(name, raw, f"value not supported: {exc}")
        return
    if key == "model.clip_skip" and value == 0:
        value = 1  # kohya: 0 or unset = the last layer
    draft.set_from(key, value, name, raw)


def _fixed(text: str, annotation) -> Any:
    return {"true": True, "false": False}.get(text, text) if annotation is bool else text


def _convert(raw: Any, annotation) -> Any:
    if annotation is bool:
        return flag(raw)
    if annotation in (int, float):
        return number(raw, annotation)
    if get_origin(annotation) is list:
        return raw if isinstance(raw, list) else [str(raw)]
    if annotation is str or get_origin(annotation) is not None and get_args(annotation):
        return str(raw).strip() if not isinstance(raw, str) else raw
    return raw


def check_paths(draft: Draft) -> None:
    """Missing or relative paths are warnings: the preset may be for another machine."""
    for key in PATH_KEYS:
        entry = draft.values.get(key)
        if entry is None or not entry.value:
            continue
        value = str(entry.value)
        path = Path(value).expanduser()
        if not path.is_absolute() and not re.match(r"^[A-Za-z]:[\\/]", value):
            draft.warn(f'{key} = "{value}" is relative: this trainer reads it relative to the '
                       "preset's folder (kohya: to the folder it ran in)")
        if not path.exists() and key != "output.dir":  # the trainer creates that one
            hint = ""
            if key == "model.path" and re.fullmatch(r"[\w.-]+/[\w.-]+", value):
                hint = ("; a Hugging Face model id? This trainer loads files offline: download "
                        "the model and set model.path to its .safetensors or folder")
            if re.match(r"^[A-Za-z]:[\\/]|^\\\\", value):
                hint = "; a Windows path: train on that machine, or change it here"
            draft.warn(f'{key} = "{value}" does not exist on this machine (kept as written){hint}')
