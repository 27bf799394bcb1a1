"""`python -m trainer extract`: a LoRA (LoCon with `--conv-rank`) approximating
the difference between a fine-tuned model and its base, layer by layer.

As kohya sd-scripts' networks/extract_lora_from_models.py: for every layer
our adapters target (`networks.targets`, so the file has our kohya names and
loads everywhere), the best rank-r approximation of W_tuned - W_base by SVD
(`networks.lowrank.low_rank`), with alpha = the module's rank, so the scale
alpha / rank is 1 and the file applied at weight 1 adds that approximation.
The text encoder is all or nothing, as in kohya: its layers are extracted
only when one of them changed by more than `--min-diff` (largest absolute
element difference, kohya's default 0.01); a fine-tune that left it alone
gives a U-Net-only file. Unlike kohya, a layer whose difference is exactly
zero is left out (it would be a zero module), and the factors are not
clamped at a quantile, so a rank that covers the difference reproduces it.
Each module's relative Frobenius error ||delta - up @ down|| / ||delta|| is
reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import UserError
from core.tool_progress import report

PRECISIONS = ("fp16", "bf16", "fp32")
SUFFIX = ".safetensors"
DEFAULT_MIN_DIFF = 0.01  # kohya's --min_diff


@dataclass(frozen=True)
class ExtractRequest:
    base: Path
    tuned: Path
    rank: int
    out: Path
    conv_rank: int | None = None
    min_diff: float = DEFAULT_MIN_DIFF
    precision: str = "fp16"


@dataclass(frozen=True)
class ModuleError:
    lora_name: str
    rank: int
    relative_error: float


@dataclass
class ExtractResult:
    out: Path
    modules: list[ModuleError] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)  # exactly zero difference: left out
    text_encoder_max_diff: float = 0.0
    text_encoder_extracted: bool = False

    def to_json(self) -> dict:
        return {
            "out": str(self.out),
            "modules": [
                {"name": m.lora_name, "rank": m.rank, "relative_error": m.relative_error}
                for m in self.modules
            ],
            "unchanged_left_out": self.unchanged,
            "text_encoder": {"extracted": self.text_encoder_extracted,
                             "max_abs_diff": self.text_encoder_max_diff},
        }


def check_request(request: ExtractRequest) -> None:
    """Every argument mistake as a UserError, before any model loads."""
    for option, path in (("--base", request.base), ("--tuned", request.tuned)):
        if not path.exists():
            raise UserError(
                f"{option} {path} does not exist; expected an SD 1.x .safetensors checkpoint "
                "or a diffusers folder containing model_index.json."
            )
    if request.rank < 1 or (request.conv_rank is not None and request.conv_rank < 1):
        raise UserError("--rank and --conv-rank must be at least 1 (e.g. --rank 32).")
    if not (math.isfinite(request.min_diff) and request.min_diff >= 0):
        raise UserError(f"--min-diff {request.min_diff}: use a number >= 0 (kohya's is 0.01).")
    if request.precision not in PRECISIONS:
        raise UserError(f"--precision {request.precision}: choose one of {', '.join(PRECISIONS)}.")
    out = request.out
    if out.suffix.lower() != SUFFIX:
        raise UserError(f"--out {out}: an adapter is written as .safetensors; name it e.g. "
                        f"{out.with_suffix(SUFFIX).name}.")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name such as "
                        f"{out / 'extracted.safetensors'}.")
    if any(out.resolve() == p.resolve() for p in (request.base, request.tuned)):
        raise UserError(f"--out {out} is one of the inputs; choose a new name for the output.")
    if request.base.resolve() == request.tuned.resolve():
        raise UserError("--base and --tuned are the same model; there is no difference to "
                        "extract. Give the fine-tuned model as --tuned.")


def paired_layers(base, tuned, conv: bool, request: ExtractRequest) -> tuple[list, list]:
    """(U-Net pairs, text encoder pairs) of (lora_name, base layer, tuned layer,
    is k x k conv); a UserError when the two models' layers differ."""
    from networks.targets import text_encoder_targets, unet_targets

    pairs = []
    for targets in ((unet_targets(base.unet, conv), unet_targets(tuned.unet, conv)),
                    (text_encoder_targets(base.text_encoder),
                     text_encoder_targets(tuned.text_encoder))):
        a, b = list(targets[0]), list(targets[1])
        for t_a, t_b in zip(a, b, strict=False):
            shape_a, shape_b = tuple(t_a.layer.weight.shape), tuple(t_b.layer.weight.shape)
            if t_a.lora_name != t_b.lora_name or shape_a != shape_b:
                raise _different(request, f"layer {t_a.lora_name} is {shape_a} in the base and "
                                 f"{t_b.lora_name} {shape_b} in the tuned model")
        if len(a) != len(b):
            raise _different(request, f"the base has {len(a)} such layers, the tuned model "
                             f"{len(b)}")
        pairs.append([(t.lora_name, t.layer, u.layer, t.is_conv_kxk)
                      for t, u in zip(a, b, strict=True)])
    return pairs[0], pairs[1]


def _different(request: ExtractRequest, detail: str) -> UserError:
    return UserError(
        f"--base {request.base} and --tuned {request.tuned} are different architectures "
        f"({detail}). A LoRA can only be extracted from a model fine-tuned from the base: "
        "give the checkpoint it was trained from as --base."
    )


def text_encoder_max_diff(pairs: list) -> float:
    """kohya's test of a changed text encoder: the largest |W_tuned - W_base|."""
    return max((float((b.weight.detach().float() - a.weight.detach().float()).abs().max())
                for _, a, b, _ in pairs), default=0.0)


def extract(request: ExtractRequest) -> ExtractResult:
    """Write the extracted adapter; the per-module errors and what was left out."""
    check_request(request)
    import sys

    import torch

    from networks.kohya_file import save_network_file
    from networks.lowrank import low_rank
    from trainer.cpu_threads import choose_cpu_threads
    from trainer.model_loading import load_sd_model

    # The trainer's rule (one core left free): on the 2-core VM the SVDs took
    # 117 s of CPU with one thread and 741 s with two (BENCHMARKS.md).
    print(choose_cpu_threads("cpu"), file=sys.stderr, flush=True)
    base = load_sd_model(request.base)
    report(1, 2, f"loaded base {request.base.name}")
    tuned = load_sd_model(request.tuned)
    report(2, 2, f"loaded tuned {request.tuned.name}")
    unet_pairs, text_pairs = paired_layers(base, tuned, request.conv_rank is not None, request)
    result = ExtractResult(request.out, text_encoder_max_diff=text_encoder_max_diff(text_pairs))
    result.text_encoder_extracted = result.text_encoder_max_diff > request.min_diff
    work = unet_pairs + (text_pairs if result.text_encoder_extracted else [])
    tensors: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for done, (name, layer_a, layer_b, kxk) in enumerate(work, start=1):
            delta = layer_b.weight.float() - layer_a.weight.float()
            if not delta.any():
                result.unchanged.append(name)
                report(done, len(work), f"{name} unchanged, left out")
                continue
            approx = low_rank(delta, request.conv_rank if kxk else request.rank)
            total = float(approx.singular_values.double().pow(2).sum().sqrt())
            error = approx.error / total
            tensors[f"{name}.lora_down.weight"] = approx.down
            tensors[f"{name}.lora_up.weight"] = approx.up
            tensors[f"{name}.alpha"] = torch.tensor(float(approx.rank))
            result.modules.append(ModuleError(name, approx.rank, error))
            report(done, len(work), f"{name} rank {approx.rank}, error {error:.3g}")
    if not tensors:
        raise UserError(
            f"--tuned {request.tuned} has the same weights as --base {request.base} in every "
            "layer a LoRA adapts; there is nothing to extract."
        )
    save_network_file(request.out, tensors, extract_metadata(request, result),
                      request.precision)
    return result


def extract_metadata(request: ExtractRequest, result: ExtractResult) -> dict[str, str]:
    """Our adapter header (`build_metadata`) plus where the file came from."""
    from networks.metadata import ExportInfo, build_metadata
    from networks.network import NetworkSpec
    from networks.tool_metadata import carried_metadata

    conv = request.conv_rank
    spec = NetworkSpec(
        algorithm="locon" if conv else "lora", rank=request.rank, alpha=request.rank,
        conv_rank=conv or request.rank, conv_alpha=conv or request.rank,
        train_text_encoder=result.text_encoder_extracted,
    )
    info = ExportInfo(title=request.out.stem, output_name=request.out.stem,
                      base_model_name=request.base.name)
    detail = (f"rank {request.rank}" + (f", conv rank {conv}" if conv else "")
              + f" from {request.tuned.name} - {request.base.name}")
    updates = {
        "ss_extracted_from_base": request.base.name,
        "ss_extracted_from_tuned": request.tuned.name,
        "ss_extract_min_diff": f"{request.min_diff:g}",
        "ss_training_comment": f"extracted by SVD: {detail}",
    }
    return carried_metadata(build_metadata(spec, info), updates, tool="extract", detail=detail)


def summary_lines(result: ExtractResult, request: ExtractRequest) -> list[str]:
    """The text report: one line per module, then what was left out and why."""
    lines = [f"{m.lora_name}  rank {m.rank}  relative error {m.relative_error:.4f}"
             for m in result.modules]
    unet = sum(m.lora_name.startswith("lora_unet_") for m in result.modules)
    lines.append(f"extracted {len(result.modules)} modules ({unet} U-Net, "
                 f"{len(result.modules) - unet} text encoder)")
    if result.modules:
        worst = max(result.modules, key=lambda m: m.relative_error)
        mean = sum(m.relative_error for m in result.modules) / len(result.modules)
        lines.append(f"relative Frobenius error: mean {mean:.4f}, worst {worst.relative_error:.4f}"
                     f" ({worst.lora_name})")
    if not result.text_encoder_extracted:
        lines.append(f"text encoder left out: its largest change {result.text_encoder_max_diff:.3g}"
                     f" is not above --min-diff {request.min_diff:g} (U-Net only, as kohya)")
    if result.unchanged:
        lines.append(f"{len(result.unchanged)} layers have exactly the base weights, left out "
                     f"(e.g. {result.unchanged[0]})")
    return lines
