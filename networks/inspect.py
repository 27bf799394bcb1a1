"""`python -m networks inspect FILE`: what an adapter file holds and which
tools will have trouble loading it.

A file that cannot be read at all is a UserError (the CLI's exit 2); what is
wrong inside a readable file is a problem in the report (exit 1): loaders
would crash on it, skip it or apply something else than what was trained.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch

from core.errors import UserError

from .algorithms import ALGORITHMS, file_algorithm
from .base import shape_text
from .file_header import UnreadableFile, read_header
from .kohya_file import read_network_file
from .network import group_by_module
from .registry import module_class
from .targets import TEXT_ENCODER_BLOCKS, TEXT_ENCODER_PREFIX, UNET_PREFIX

TE_LAYER_SUFFIXES = tuple(
    f"_{child}" for children in TEXT_ENCODER_BLOCKS.values() for child in children
)
KNOWN_PREFIXES = (f"{UNET_PREFIX}_", f"{TEXT_ENCODER_PREFIX}_", "lora_te1_", "lora_te2_")
DIFFUSERS_SUFFIXES = {"lora_down.weight", "lora_up.weight", "alpha"}
LDM_NAME = re.compile(r"lora_unet_(input|output|middle)_block")
READ_HINT = " Give the path of a LoRA/LyCORIS .safetensors file."


@dataclass
class Inspection:
    path: str
    algorithms: dict[str, int] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)
    alphas: dict[str, int] = field(default_factory=dict)
    # DoRA modules by the axis of their magnitude: "input" / "output" channels.
    dora: dict[str, int] = field(default_factory=dict)
    # The algorithm's options as `ss_network_args` records them (LoKr's factor...).
    options: dict[str, object] = field(default_factory=dict)
    unet_modules: int = 0
    text_encoder_modules: int = 0
    dtypes: dict[str, int] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Found:
    """What the module-by-module pass collects for the file's summary lines."""

    algorithms: Counter = field(default_factory=Counter)
    ranks: Counter = field(default_factory=Counter)
    alphas: Counter = field(default_factory=Counter)
    dtypes: Counter = field(default_factory=Counter)
    unknown: list[str] = field(default_factory=list)
    non_finite: list[str] = field(default_factory=list)
    diffusers_blockers: set[str] = field(default_factory=set)
    bad: dict[str, list[str]] = field(default_factory=dict)  # kind -> "module: detail"


def inspect_file(path: str) -> Inspection:
    """The report on an adapter file; UserError when it cannot be read at all."""
    try:
        read_header(path)  # says what is wrong with a file safetensors would only call invalid
    except UnreadableFile as problem:
        raise UserError(f"{problem}{READ_HINT}") from None
    tensors, metadata = read_network_file(path)
    report = Inspection(path=str(path), metadata=metadata)
    found = _Found()
    for lora_name, module_tensors in sorted(group_by_module(tensors).items()):
        _inspect_module(lora_name, module_tensors, found, report)
    report.algorithms, report.ranks = dict(found.algorithms), dict(found.ranks)
    report.alphas, report.dtypes = dict(found.alphas), dict(found.dtypes)
    _read_options(metadata, found.algorithms, report)
    _report_module_problems(found.bad, report)
    if not tensors:
        report.problems.append("the file holds no tensors: there is nothing to apply.")
    if found.unknown:
        report.problems.append(f"{len(found.unknown)} unknown modules (e.g. {found.unknown[0]}): "
                               "no loader will apply them.")
    if found.non_finite:
        report.problems.append(
            f"{len(found.non_finite)} tensors hold NaN/Inf (e.g. {found.non_finite[0]}).")
    if any(name.startswith("lycoris_") for name in found.unknown):
        report.problems.append(
            "`lycoris_` prefixes: A1111 does not load them; use lora_unet_/lora_te_."
        )
    if found.diffusers_blockers:
        report.warnings.append(
            "diffusers load_lora_weights cannot load keys "
            f"{', '.join(sorted(found.diffusers_blockers))} (A1111, ComfyUI and lycoris can)."
        )
    if any(LDM_NAME.match(n) for n in tensors):
        report.warnings.append(
            "LDM-style U-Net names: diffusers and A1111 expect diffusers-style names."
        )
    return report


def _inspect_module(
    lora_name: str, module_tensors: dict[str, torch.Tensor], found: _Found, report: Inspection
) -> None:
    suffixes = set(module_tensors)
    algorithm = file_algorithm(suffixes)
    found.dtypes.update(str(t.dtype).removeprefix("torch.") for t in module_tensors.values())
    found.non_finite += [f"{lora_name}.{s}" for s, t in module_tensors.items()
                         if _has_non_finite(t)]
    if algorithm is None or not lora_name.startswith(KNOWN_PREFIXES):
        found.unknown.append(lora_name)
        return
    found.algorithms[algorithm.name] += 1
    rank, shape_problem = module_class(algorithm.name).check_file_tensors(module_tensors)
    found.ranks[str(rank)] += 1
    alpha, alpha_problem = _alpha(module_tensors.get("alpha"), rank)
    found.alphas[alpha] += 1
    for kind, detail in (("rank 0", "rank 0" if rank == 0 else None),
                         ("shapes", shape_problem), ("alpha", alpha_problem)):
        if detail:
            found.bad.setdefault(kind, []).append(f"{lora_name}: {detail}")
    if lora_name.startswith(f"{UNET_PREFIX}_"):
        report.unet_modules += 1
    else:
        report.text_encoder_modules += 1
        _check_text_encoder_name(lora_name, report)
    found.diffusers_blockers |= suffixes - DIFFUSERS_SUFFIXES
    _check_dora(lora_name, module_tensors, report)


def _read_options(metadata: dict[str, str], algorithms: Counter, report: Inspection) -> None:
    """The options `ss_network_args` records for the file's algorithm (its "algo",
    else the one its modules show), at LyCORIS' names; a value that is not one
    is a warning (loading then goes by the tensors)."""
    try:
        args = json.loads(metadata.get("ss_network_args") or "{}")
    except json.JSONDecodeError:
        args = {}
    if not isinstance(args, dict):
        return
    name = args.get("algo")
    if not isinstance(name, str) or name not in ALGORITHMS:
        name = next(iter(algorithms), None)
    if name is None:
        return
    for option in ALGORITHMS[name].options:
        if option.arg in args:
            try:
                report.options[option.name] = option.from_arg(str(args[option.arg]))
            except ValueError as exc:
                _once(report.warnings, f"ss_network_args {exc}: the tensors decide instead.")


_MODULE_PROBLEMS = {
    "rank 0": "have rank 0: they change nothing, and loaders that divide alpha by the rank "
              "fail on them",
    "shapes": "have tensors whose ranks or shapes do not fit together: loaders fail on them "
              "or apply something else",
    "alpha": "have an alpha that is not one finite, non-negative number: loaders fail on it "
             "or scale the update wrongly",
}


def _report_module_problems(bad: dict[str, list[str]], report: Inspection) -> None:
    for kind, modules in bad.items():
        report.problems.append(f"{len(modules)} modules {_MODULE_PROBLEMS[kind]} "
                               f"(e.g. {modules[0]}).")
    if "0" in report.alphas:
        report.warnings.append(
            f"{report.alphas['0']} modules have alpha 0: lycoris and this trainer scale them "
            "by 0 (no effect), A1111 and kohya by 1 (as if alpha = rank).")


def _alpha(alpha: torch.Tensor | None, rank: int | str) -> tuple[str, str | None]:
    """How alpha is shown in the summary, and what is wrong with it, if anything.
    `rank` is "full" for a module without one (LoKr's whole factors: scale 1)."""
    if alpha is None:
        return ("missing (scale 1)" if isinstance(rank, str)
                else f"missing (scale 1, as alpha={rank})"), None
    if alpha.numel() != 1:
        return "invalid", f"alpha has shape {shape_text(alpha)}, not one number"
    value = float(alpha)
    if math.isnan(value) or math.isinf(value):
        return "invalid", f"alpha is {value}"
    if value < 0:
        return "invalid", f"alpha is negative ({value:g})"
    return (str(int(value)) if value.is_integer() else f"{value:g}"), None


def _has_non_finite(t: torch.Tensor) -> bool:
    return t.is_floating_point() and not torch.isfinite(t.float()).all()


def _check_text_encoder_name(lora_name: str, report: Inspection) -> None:
    if lora_name.startswith(f"{TEXT_ENCODER_PREFIX}_encoder_"):
        _once(
            report.problems,
            "text-encoder names lack `text_model_` (transformers >= 5.6 naming): "
            "no loader recognises `lora_te_encoder_...`.",
        )
    elif not lora_name.endswith(TE_LAYER_SUFFIXES):
        _once(
            report.warnings,
            f"text-encoder module {lora_name} is not one of the six CLIP layer kinds: "
            "ComfyUI logs 'lora key not loaded'.",
        )


def _check_dora(
    lora_name: str, module_tensors: dict[str, torch.Tensor], report: Inspection
) -> None:
    scale = module_tensors.get("dora_scale")
    if scale is None:
        return
    on_output = scale.dim() >= 2 and scale.shape[1] == 1 and scale.shape[0] > 1
    axis = "output" if on_output else "input"
    report.dora[axis] = report.dora.get(axis, 0) + 1
    if not on_output:
        _once(
            report.warnings, "dora_scale of shape (1, in) (DoRA per input channel, as A1111 and "
            "ComfyUI apply it): lycoris 4.1 loads it only when set to wd_on_output=False; its "
            "loader from a file assumes the output axis."
        )
    if on_output:
        _once(
            report.warnings, "dora_scale of shape (out, 1) (DoRA per output channel): A1111 "
            "applies it wrongly and ComfyUI has an open bug for it; lycoris loads it as trained."
        )


def _once(messages: list[str], message: str) -> None:
    if message not in messages:
        messages.append(message)


def format_report(report: Inspection) -> str:
    lines = [f"File: {report.path}"]
    lines.append(
        "Algorithm: " + (", ".join(f"{a} ({n})" for a, n in report.algorithms.items()) or "none")
    )
    lines.append("Ranks: " + ", ".join(f"{r} x{n}" for r, n in report.ranks.items()))
    lines.append("Alphas: " + ", ".join(f"{a} x{n}" for a, n in report.alphas.items()))
    if report.options:
        lines.append("Options: " + ", ".join(
            f"{k} = {str(v).lower() if isinstance(v, bool) else v}"
            for k, v in report.options.items()))
    if report.dora:
        lines.append("DoRA: " + ", ".join(f"{axis} axis x{n}" for axis, n in report.dora.items()))
    lines.append(
        f"Modules: U-Net {report.unet_modules}, text encoder {report.text_encoder_modules}"
    )
    lines.append("Tensor types: " + ", ".join(f"{d} x{n}" for d, n in report.dtypes.items()))
    lines.append("Metadata:")
    for key in sorted(report.metadata):
        value = report.metadata[key]
        lines.append(f"  {key}: {value if len(value) <= 120 else value[:117] + '...'}")
    for label, messages in (("PROBLEM", report.problems), ("warning", report.warnings)):
        lines += [f"{label}: {m}" for m in messages]
    if not report.problems:
        lines.append("OK: loads in A1111, ComfyUI and lycoris.")
    else:
        lines.append(f"Problems found: {len(report.problems)}.")
    return "\n".join(lines)
