"""The safetensors header of an exported adapter: kohya `ss_*` keys and
Stability's ModelSpec 1.0.1. All values are strings."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime

from .algorithms import ALGORITHMS
from .network import NetworkSpec

MODELSPEC_REQUIRED = (
    "modelspec.sai_model_spec",
    "modelspec.architecture",
    "modelspec.implementation",
    "modelspec.title",
    "modelspec.resolution",
)
SS_MINIMUM = (
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_args",
    "ss_base_model_version",
    "ss_v2",
)


@dataclass
class ExportInfo:
    """Facts about the run and the user's description of the adapter."""

    title: str = "lora"
    output_name: str = "lora"
    base_model_name: str = ""
    base_model_sha256: str = ""
    v_parameterization: bool = False
    resolution: int = 512
    author: str = ""
    description: str = ""
    trigger_phrase: str = ""
    tags: str = ""
    license: str = ""
    usage_hint: str = ""
    clip_skip: int = 1
    comment: str = ""
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)
    # Training facts; empty for files not produced by a training run.
    training: dict[str, object] = field(default_factory=dict)
    started_at: datetime | None = None
    finished_at: datetime | None = None


def network_args(spec: NetworkSpec) -> dict[str, str]:
    """`ss_network_args` as LyCORIS writes it: the algorithm, conv ranks, and
    each option under its LyCORIS name. Options at their default are left out
    (files read the same), except that a DoRA file always says its axis."""
    args = {"algo": spec.algorithm}
    if spec.targets_conv:
        args |= {"conv_dim": str(spec.conv_rank), "conv_alpha": str(_num(spec.conv_alpha))}
    values = spec.option_values()
    for option in ALGORITHMS[spec.algorithm].options:
        value = values[option.name]
        if value != option.default or (option.name == "dora_on_output" and spec.dora):
            args[option.arg] = option.to_arg(value)
    return args


def build_metadata(spec: NetworkSpec, info: ExportInfo) -> dict[str, str]:
    now = datetime.now(UTC)
    finished = info.finished_at or now
    prediction = "v" if info.v_parameterization else "epsilon"
    meta = {
        # kohya: LyCORIS algorithms name lycoris' module, plain LoRA kohya's.
        # kohya's own module has no DoRA.
        "ss_network_module": (
            "networks.lora" if spec.algorithm == "lora" and not spec.dora else "lycoris.kohya"
        ),
        "ss_network_dim": str(spec.rank),
        "ss_network_alpha": str(_num(spec.alpha)),
        "ss_network_args": json.dumps(network_args(spec)),
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_output_name": info.output_name,
        "ss_sd_model_name": info.base_model_name,
        "ss_new_sd_model_hash": info.base_model_sha256,
        "ss_resolution": f"({info.resolution}, {info.resolution})",
        "ss_clip_skip": str(info.clip_skip),
        "ss_training_comment": info.comment,
        "ss_tag_frequency": json.dumps(info.tag_frequency),
        "ss_training_finished_at": str(finished.timestamp()),
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": info.title,
        "modelspec.resolution": f"{info.resolution}x{info.resolution}",
        "modelspec.date": finished.isoformat(timespec="seconds"),
        "modelspec.prediction_type": prediction,
        "modelspec.encoder_layer": str(info.clip_skip),
    }
    if info.started_at:
        meta["ss_training_started_at"] = str(info.started_at.timestamp())
    for key, value in info.training.items():
        meta[f"ss_{key}"] = str(value)
    optional = {
        "modelspec.author": info.author,
        "modelspec.description": info.description,
        "modelspec.trigger_phrase": info.trigger_phrase,
        "modelspec.tags": info.tags,
        "modelspec.license": info.license,
        "modelspec.usage_hint": info.usage_hint,
    }
    meta |= {k: v for k, v in optional.items() if v}
    return meta


def _num(value: float) -> float | int:
    """4.0 -> 4 so headers read like kohya's ("4", not "4.0")."""
    return int(value) if float(value).is_integer() else value
