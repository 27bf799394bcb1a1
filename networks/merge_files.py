"""`python -m networks merge`: several adapter files, each with a weight, as one.

The merged file's delta is the weighted sum of the inputs' deltas, module by
module. Exactly, where the layout allows it:

- a module whose inputs are all plain LoRA/LoCon (no Tucker core) gets their
  ranks side by side: up = [c1 up1, c2 up2, ...], down = [down1; down2; ...],
  c_i = w_i * alpha_i / r_i carried into the factors (split as sqrt(|c_i|)
  on each side, the sign on up) and alpha = the summed rank, so scale 1;
- a module in only one input is kept in its own algorithm, the weight folded
  into one factor its delta is linear in.

Otherwise (a module that LoHa, LoKr or Tucker inputs share), or whenever
`--rank` is given, each module's weighted sum is truncated by SVD to that rank
(the best approximation at that rank) and written as LoRA/LoCon. Without
`--rank` such a merge is refused, naming a module that needs it.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from core.errors import UserError
from core.tool_progress import report

from .kohya_file import save_network_file
from .lowrank import delta_factors, factored_svd, file_module, from_svd, svd, weight_shape_for
from .registry import algorithm_for_keys
from .resize import (
    Adapter,
    check_out_path,
    file_dtype,
    fold_alpha,
    is_kxk,
    lora_header,
    module_problem,
    read_adapter,
)

# The tensor each algorithm's delta is linear in: weighting a lone module scales it.
LINEAR_FACTOR = ("lora_up.weight", "hada_w1_a", "lokr_w1", "lokr_w1_a")


@dataclass
class Source:
    adapter: Adapter
    weight: float


@dataclass
class ModuleMerge:
    name: str
    sources: int
    rank: int
    mode: str  # "concat" | "kept" | "svd"
    kept_fraction: float = 1.0


@dataclass
class MergeReport:
    modules: list[ModuleMerge]
    out: str
    summary: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"modules": [asdict(m) for m in self.modules], "out": self.out,
                "summary": self.summary}


def parse_source(text: str) -> tuple[str, float]:
    """FILE or FILE:WEIGHT. Split at the last ':' only when what follows reads
    as a number, so `C:\\x.safetensors` and `dir:a/b.safetensors` stay paths."""
    head, sep, tail = text.rpartition(":")
    if not sep or not head:
        return text, 1.0
    try:
        weight = float(tail)
    except ValueError:
        if head.endswith(".safetensors") and not Path(text).exists():
            raise UserError(f"{text}: the weight {tail!r} after ':' is not a number; write "
                            "FILE:0.7 (or FILE alone for weight 1).") from None
        return text, 1.0
    if not math.isfinite(weight):
        raise UserError(f"{text}: the weight must be a finite number, not {tail!r}.")
    return head, weight


def _is_plain_lora(tensors: dict[str, torch.Tensor]) -> bool:
    return "lora_down.weight" in tensors and "lora_mid.weight" not in tensors


def _parts(sources: list[Source], name: str):
    """(weight, tensors, weight shape) of each input that has module `name`."""
    parts = []
    for source in sources:
        tensors = source.adapter.modules.get(name)
        if tensors is not None:
            try:
                shape = weight_shape_for(name, tensors)
            except ValueError as exc:
                raise module_problem(source.adapter.path, name, exc) from None
            parts.append((source, tensors, shape))
    return parts


def _common_shape(name: str, parts) -> tuple[int, ...]:
    """The layer shape every input agrees on; (out, in) and (out, in, 1, 1) are
    the same layer (a 1x1 conv some tools store flat)."""
    def canonical(shape):
        return tuple(shape) + (1, 1) if len(shape) == 2 else tuple(shape)

    shapes = {canonical(shape) for _, _, shape in parts}
    if len(shapes) > 1:
        found = ", ".join(f"{s.adapter.path.name}: {tuple(shape)}" for s, _, shape in parts)
        raise UserError(f"Module {name} has different layer shapes in the inputs ({found}): "
                        "they were trained for different base models and cannot be merged.")
    four_d = [shape for _, _, shape in parts if len(shape) == 4]
    return tuple(four_d[0]) if four_d else tuple(parts[0][2])


def _weighted_factors(name: str, parts, shape) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Concatenated (up (out, R), down (R, in * taps)) with each c_i carried in,
    or None when an input has no low-rank factors (`lowrank.delta_factors`)."""
    ups, downs = [], []
    for source, tensors, _ in parts:
        module = file_module(tensors, shape, name)
        factors = delta_factors(module)
        if factors is None:
            return None
        c = source.weight * module.scale
        root = math.sqrt(abs(c))
        ups.append(factors[0] * (root if c >= 0 else -root))
        downs.append(factors[1] * root)
    return torch.cat(ups, 1), torch.cat(downs, 0)


def _to_layout(up: torch.Tensor, down: torch.Tensor, shape) -> tuple[torch.Tensor, torch.Tensor]:
    rank = up.shape[1]
    if len(shape) == 4:
        return up.reshape(shape[0], rank, 1, 1), down.reshape(rank, *shape[1:])
    return up, down


def _kept(source: Source, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if source.weight == 1:
        return dict(tensors)
    key = next(k for k in LINEAR_FACTOR if k in tensors)
    return {**tensors, key: tensors[key].float() * source.weight}


@dataclass(frozen=True)
class MergePlan:
    rank: int | None = None  # SVD every module to this rank
    conv_rank: int | None = None  # for k x k convs; None: as `rank`
    precision: str | None = None


def merge_module(name: str, parts, plan: MergePlan, precision: str):
    """(tensors to write, ModuleMerge, (rank, alpha, k x k) or None for a kept
    non-LoRA module)."""
    shape = _common_shape(name, parts)
    plain = all(_is_plain_lora(t) for _, t, _ in parts)
    if plan.rank is None and len(parts) == 1:
        source, tensors, _ = parts[0]
        out = _kept(source, tensors)
        if not plain:
            return out, ModuleMerge(name, 1, file_module(tensors, shape, name).rank, "kept"), None
        rank = tensors["lora_down.weight"].shape[0]
        alpha = float(tensors.get("alpha", torch.tensor(float(rank))))
        return out, ModuleMerge(name, 1, rank, "kept"), (rank, alpha, is_kxk(shape))
    if plan.rank is None:
        up, down = _to_layout(*_weighted_factors(name, parts, shape), shape)
        out = fold_alpha(up, down, 1.0, up.shape[1], precision)
        return out, ModuleMerge(name, len(parts), up.shape[1], "concat"), (
            up.shape[1], float(up.shape[1]), is_kxk(shape))
    rank = (plan.conv_rank or plan.rank) if is_kxk(shape) else plan.rank
    factors = _weighted_factors(name, parts, shape)
    if factors is not None:  # the SVD of the concatenated factors: no full-size product
        u, s, vh = factored_svd(*factors)
    else:
        total = sum(source.weight * file_module(t, shape, name).scaled_delta()
                    for source, t, _ in parts)
        u, s, vh = svd(total)
    lr = from_svd(u, s, vh, rank, shape)
    out = fold_alpha(lr.up, lr.down, 1.0, lr.rank, precision)
    return out, ModuleMerge(name, len(parts), lr.rank, "svd", lr.kept_fraction), (
        lr.rank, float(lr.rank), is_kxk(shape))


def merge_files(inputs: list[tuple[str | os.PathLike, float]], out: str | os.PathLike,
                plan: MergePlan = MergePlan(), progress: bool = True) -> MergeReport:
    if len(inputs) < 2:
        raise UserError("merge needs at least two input files (FILE[:WEIGHT] ...).")
    sources = [Source(read_adapter(path), float(weight)) for path, weight in inputs]
    out = check_out_path(out, [s.adapter.path for s in sources])
    precision = plan.precision or sources[0].adapter.precision
    _refuse_foreign(sources)
    names = sorted({n for s in sources for n in s.adapter.modules})
    if plan.rank is None:
        _refuse_inexact(sources, names)
    tensors: dict[str, torch.Tensor] = {}
    modules, written, kept_kinds = [], {}, Counter()
    for done, name in enumerate(names, 1):
        parts = _parts(sources, name)
        try:
            new, info, header = merge_module(name, parts, plan, precision)
        except ValueError as exc:
            raise module_problem(parts[0][0].adapter.path, name, exc) from None
        tensors |= file_dtype(name, new, precision)
        for source in sources:  # freed as it goes
            source.adapter.modules.pop(name, None)
        modules.append(info)
        if header is None:
            kept_kinds[algorithm_for_keys(set(new)).name] += 1
        else:
            written[name] = header
        if progress:
            report(done, len(names), name)
    meta = _header(sources, written, kept_kinds, plan)
    save_network_file(out, tensors, meta, precision)
    return MergeReport(modules, str(out), _summary(sources, modules, out, precision))


def _refuse_foreign(sources: list[Source]) -> None:
    """Tensors that belong to no adapter module (an embedding bundle, another
    tool's data) have no weighted sum: refused, so nothing is lost unsaid."""
    for source in sources:
        if source.adapter.other:
            keys = sorted(source.adapter.other)
            raise UserError(
                f"{source.adapter.path} holds {len(keys)} tensors that are no adapter module "
                f"(e.g. {keys[0]}), which a merge cannot add. Write a copy without them "
                f"first (python -m networks convert {source.adapter.path} --out COPY."
                "safetensors --drop-unknown lists what it leaves out) and merge that.")


def _refuse_inexact(sources: list[Source], names: list[str]) -> None:
    """Before any work: a module that several inputs share, not all plain LoRA."""
    for name in names:
        shared = [s.adapter.modules[name] for s in sources if name in s.adapter.modules]
        if len(shared) > 1 and not all(_is_plain_lora(t) for t in shared):
            raise UserError(
                f"Module {name} is in {len(shared)} inputs and not all of them are plain "
                "LoRA/LoCon (LoHa, LoKr or a Tucker core): their sum has no exact LoRA form. "
                "Give --rank N to write the best rank-N approximation of each module's "
                "weighted sum.")


def _describe(sources: list[Source], plan: MergePlan) -> str:
    listed = " + ".join(f"{s.adapter.path.name} x{s.weight:g}" for s in sources)
    how = f"SVD to rank {plan.rank}" if plan.rank else "exact"
    if plan.rank and plan.conv_rank:
        how += f" (conv {plan.conv_rank})"
    return f"{listed} ({how})"


def _header(sources, written, kept_kinds: Counter, plan: MergePlan) -> dict[str, str]:
    detail = _describe(sources, plan)
    meta = lora_header(sources[0].adapter.metadata, written, False, "merge", detail,
                       f"merged from {detail}")
    if kept_kinds:  # LoHa/LoKr modules kept as they were: a LyCORIS file
        algo = kept_kinds.most_common(1)[0][0]
        meta["ss_network_module"] = "lycoris.kohya"
        meta["ss_network_args"] = json.dumps({"algo": algo})
    return meta


def _summary(sources, modules: list[ModuleMerge], out: Path, precision: str) -> dict:
    kept = [m.kept_fraction for m in modules if m.mode == "svd"]
    return {
        "inputs": [{"path": str(s.adapter.path), "weight": s.weight} for s in sources],
        "modules": len(modules),
        "modes": dict(Counter(m.mode for m in modules)),
        "mean_kept_fraction": sum(kept) / len(kept) if kept else 1.0,
        "min_kept_fraction": min(kept, default=1.0),
        "precision": precision,
        "size_after": out.stat().st_size,
    }
