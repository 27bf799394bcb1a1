"""`python -m networks inspect FILE`: what an adapter file holds and which
tools will have trouble loading it (FORMATS.md sections 1-5)."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch

from .kohya_file import read_network_file
from .network import group_by_module
from .registry import module_class_for_keys
from .targets import TEXT_ENCODER_BLOCKS, TEXT_ENCODER_PREFIX, UNET_PREFIX

TE_LAYER_SUFFIXES = tuple(
    f"_{child}" for children in TEXT_ENCODER_BLOCKS.values() for child in children
)
KNOWN_PREFIXES = (f"{UNET_PREFIX}_", f"{TEXT_ENCODER_PREFIX}_", "lora_te1_", "lora_te2_")
DIFFUSERS_SUFFIXES = {"lora_down.weight", "lora_up.weight", "alpha"}
LDM_NAME = re.compile(r"lora_unet_(input|output|middle)_block")


@dataclass
class Inspection:
    path: str
    algorithms: dict[str, int] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)
    alphas: dict[str, int] = field(default_factory=dict)
    unet_modules: int = 0
    text_encoder_modules: int = 0
    dtypes: dict[str, int] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def inspect_file(path: str) -> Inspection:
    tensors, metadata = read_network_file(path)
    report = Inspection(path=str(path), metadata=metadata)
    algorithms, ranks, alphas, dtypes = Counter(), Counter(), Counter(), Counter()
    unknown, non_finite, diffusers_blockers = [], [], set()
    for lora_name, module_tensors in sorted(group_by_module(tensors).items()):
        suffixes = set(module_tensors)
        module_cls = module_class_for_keys(suffixes)
        dtypes.update(str(t.dtype).removeprefix("torch.") for t in module_tensors.values())
        non_finite += [f"{lora_name}.{s}" for s, t in module_tensors.items() if _has_non_finite(t)]
        if module_cls is None or not lora_name.startswith(KNOWN_PREFIXES):
            unknown.append(lora_name)
            continue
        algorithms[module_cls.algorithm] += 1
        rank = _rank(module_tensors)
        ranks[str(rank)] += 1
        alphas[_format_alpha(module_tensors.get("alpha"), rank)] += 1
        if lora_name.startswith(f"{UNET_PREFIX}_"):
            report.unet_modules += 1
        else:
            report.text_encoder_modules += 1
            _check_text_encoder_name(lora_name, report)
        diffusers_blockers |= suffixes - DIFFUSERS_SUFFIXES
        _check_dora(lora_name, module_tensors, report)
    report.algorithms, report.ranks, report.alphas = dict(algorithms), dict(ranks), dict(alphas)
    report.dtypes = dict(dtypes)
    if unknown:
        report.problems.append(
            f"{len(unknown)} unknown modules (e.g. {unknown[0]}): no loader will apply them."
        )
    if non_finite:
        report.problems.append(f"{len(non_finite)} tensors hold NaN/Inf (e.g. {non_finite[0]}).")
    if any(name.startswith("lycoris_") for name in unknown):
        report.problems.append(
            "`lycoris_` prefixes: A1111 does not load them; use lora_unet_/lora_te_."
        )
    if diffusers_blockers:
        report.warnings.append(
            "diffusers load_lora_weights cannot load keys "
            f"{', '.join(sorted(diffusers_blockers))} (A1111, ComfyUI and lycoris can)."
        )
    if any(LDM_NAME.match(n) for n in tensors):
        report.warnings.append(
            "LDM-style U-Net names: diffusers and A1111 expect diffusers-style names."
        )
    return report


def _rank(module_tensors: dict[str, torch.Tensor]) -> int:
    for key in ("lora_down.weight", "hada_w1_b"):
        if key in module_tensors:
            return module_tensors[key].shape[0]
    return 0


def _format_alpha(alpha: torch.Tensor | None, rank: int) -> str:
    if alpha is None:
        return f"missing (scale 1, as alpha={rank})"
    value = float(alpha)
    return str(int(value)) if value.is_integer() else f"{value:g}"


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
    if scale is not None and scale.dim() >= 2 and scale.shape[1] == 1 and scale.shape[0] > 1:
        _once(
            report.warnings, "dora_scale of shape (out, 1): ComfyUI and A1111 disagree on its axis."
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
    return "\n".join(lines)
