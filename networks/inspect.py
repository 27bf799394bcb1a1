"""`python -m networks inspect FILE`: what an adapter file holds and which
tools will have trouble loading it.

A file that cannot be read at all is a UserError (the CLI's exit 2); what is
wrong inside a readable file is a problem in the report (exit 1): loaders
would crash on it, skip it or apply something else than what was trained.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch

from core.errors import UserError

from .file_header import UnreadableFile, read_header
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
READ_HINT = " Give the path of a LoRA/LyCORIS .safetensors file."


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
    module_cls = module_class_for_keys(suffixes)
    found.dtypes.update(str(t.dtype).removeprefix("torch.") for t in module_tensors.values())
    found.non_finite += [f"{lora_name}.{s}" for s, t in module_tensors.items()
                         if _has_non_finite(t)]
    if module_cls is None or not lora_name.startswith(KNOWN_PREFIXES):
        found.unknown.append(lora_name)
        return
    found.algorithms[module_cls.algorithm] += 1
    rank, shape_problem = _rank_and_shapes(module_cls.algorithm, module_tensors)
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


def _rank_and_shapes(algorithm: str, t: dict[str, torch.Tensor]) -> tuple[int, str | None]:
    """The module's rank and, when its tensors do not fit together, why."""
    if algorithm == "loha":
        return _loha_shapes(t)
    down, up, mid = t["lora_down.weight"], t["lora_up.weight"], t.get("lora_mid.weight")
    if down.dim() not in (2, 4) or up.dim() != down.dim():
        return _first_dim(down), (f"lora_down {_shape(down)} and lora_up {_shape(up)} are not "
                                  "both 2-D (linear) or both 4-D (conv)")
    rank = down.shape[0]
    if mid is None:
        if up.shape[1] != rank:
            return rank, (f"lora_down has rank {rank} ({_shape(down)}) but lora_up has rank "
                          f"{up.shape[1]} ({_shape(up)})")
    elif (down.dim() != 4 or tuple(down.shape[2:]) != (1, 1) or mid.dim() != 4
          or mid.shape[1] != rank or up.shape[1] != mid.shape[0]):
        return rank, (f"Tucker lora_down {_shape(down)}, lora_mid {_shape(mid)} and lora_up "
                      f"{_shape(up)} do not chain (rank x in x 1 x 1, rank x rank x k x k, "
                      "out x rank x 1 x 1)")
    if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
        return rank, f"lora_up {_shape(up)} is not a 1x1 convolution"
    return rank, None


def _loha_shapes(t: dict[str, torch.Tensor]) -> tuple[int, str | None]:
    w1_a, w1_b, w2_a, w2_b = (t[f"hada_w{i}_{s}"] for i in (1, 2) for s in ("a", "b"))
    t1, t2 = t.get("hada_t1"), t.get("hada_t2")
    rank = _first_dim(w1_b)
    shapes = ", ".join(f"hada_w{i}_{s} {_shape(x)}" for (i, s), x in zip(
        ((1, "a"), (1, "b"), (2, "a"), (2, "b")), (w1_a, w1_b, w2_a, w2_b), strict=True))
    if any(x.dim() != 2 for x in (w1_a, w1_b, w2_a, w2_b)):
        return rank, f"the hada_w tensors are not all 2-D ({shapes})"
    if (t1 is None) != (t2 is None):
        return rank, "only one of hada_t1 and hada_t2 is present (Tucker needs both)"
    if t1 is None:  # (out, r) @ (r, in) for each factor
        fits = w1_a.shape[1] == w1_b.shape[0] and w2_a.shape[1] == w2_b.shape[0]
        same_size = w1_a.shape[0] == w2_a.shape[0] and w1_b.shape[1] == w2_b.shape[1]
    else:  # t (r, r, k, k) with w_a (r, out), w_b (r, in)
        fits = all(x.dim() == 4 and x.shape[0] == a.shape[0] and x.shape[1] == b.shape[0]
                   for x, a, b in ((t1, w1_a, w1_b), (t2, w2_a, w2_b)))
        same_size = (w1_a.shape[1] == w2_a.shape[1] and w1_b.shape[1] == w2_b.shape[1]
                     and t1.shape[2:] == t2.shape[2:])
        shapes += f", hada_t1 {_shape(t1)}, hada_t2 {_shape(t2)}"
    if not fits:
        return rank, f"the factors' ranks do not match ({shapes})"
    if w1_b.shape[0] != w2_b.shape[0]:
        return rank, f"hada_w1 has rank {w1_b.shape[0]} but hada_w2 rank {w2_b.shape[0]}"
    if not same_size:
        return rank, f"the two Hadamard factors are not the same size ({shapes})"
    return rank, None


def _first_dim(x: torch.Tensor) -> int:
    return x.shape[0] if x.dim() else 1


def _shape(x: torch.Tensor) -> str:
    return str(tuple(x.shape))


def _alpha(alpha: torch.Tensor | None, rank: int) -> tuple[str, str | None]:
    """How alpha is shown in the summary, and what is wrong with it, if anything."""
    if alpha is None:
        return f"missing (scale 1, as alpha={rank})", None
    if alpha.numel() != 1:
        return "invalid", f"alpha has shape {_shape(alpha)}, not one number"
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
    else:
        lines.append(f"Problems found: {len(report.problems)}.")
    return "\n".join(lines)
