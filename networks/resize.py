"""`python -m networks resize`: an adapter file at another rank, module by module.

Each module's full scaled delta is truncated to its new rank by SVD (the best
approximation at that rank, Eckart-Young) and written as LoRA, or LoCon on
k x k convs. The new rank is fixed (`--rank`, `--conv-rank` for k x k convs)
or chosen per module by one of kohya's dynamic rules (`networks.lowrank.
dynamic_rank`), capped by `--rank`. A LoHa or LoKr file becomes LoRA/LoCon.

As kohya's resize_lora.py, the factors are the SVD of the delta without its
scale, and alpha is set to scale * new rank, so the file keeps the input's
alpha / rank ratio and its delta is the truncation exactly. A module never
gains rank: a rank-16 delta has no 17th direction to keep.

Also here, for `networks.merge_files`: reading an adapter for these tools,
checking the output path, and the header of a LoRA/LoCon output.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from core.cpu_cores import threads_for, threads_set_by_user, usable_cores
from core.errors import UserError
from core.tool_progress import report

from .kohya_file import SAVE_PRECISIONS, read_network_file, save_network_file
from .lowrank import (
    delta_factors,
    dynamic_rank,
    factored_svd,
    file_module,
    from_svd,
    svd,
    weight_shape_for,
)
from .network import group_by_module
from .registry import algorithm_for_keys
from .tool_metadata import carried_metadata

DTYPE_PRECISIONS = {dtype: name for name, dtype in SAVE_PRECISIONS.items()}


@dataclass
class ModuleResize:
    name: str
    old_rank: int
    new_rank: int
    kept_fraction: float
    error: float  # Frobenius norm of the delta discarded


@dataclass
class ResizeReport:
    modules: list[ModuleResize]
    out: str
    summary: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"modules": [asdict(m) for m in self.modules], "out": self.out,
                "summary": self.summary}


@dataclass
class Adapter:
    """A file as these tools read it: modules by name, unknown tensors apart."""

    path: Path
    modules: dict[str, dict[str, torch.Tensor]]
    metadata: dict[str, str]
    other: dict[str, torch.Tensor]  # tensors of no known algorithm, copied as they are
    precision: str  # of its factors


# --- shared with merge ---------------------------------------------------

def use_tool_threads() -> None:
    """The project's CPU thread rule (`core.cpu_cores`): these tools run many
    mid-sized QRs and SVDs, where waiting OpenMP threads cost most."""
    if threads_set_by_user() is None:
        torch.set_num_threads(threads_for(usable_cores()))


def check_out_path(out: str | os.PathLike, inputs: list[Path]) -> Path:
    out = Path(out)
    if out.suffix != ".safetensors":
        raise UserError(f"--out {out} must end in .safetensors: the tools write safetensors "
                        "adapters only.")
    for source in inputs:
        if out.resolve() == source.resolve() or (out.exists() and out.samefile(source)):
            raise UserError(f"--out {out} is an input file; refusing to overwrite it. Give "
                            "another file name.")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a .safetensors file name.")
    return out


def read_adapter(path: str | os.PathLike) -> Adapter:
    """A UserError for a missing or unreadable file, one with no adapter module,
    and one with DoRA modules (whose change is not a delta to resize or add)."""
    path = Path(path)
    tensors, metadata = read_network_file(path)
    modules, other = {}, {}
    for name, module_tensors in group_by_module(tensors).items():
        if algorithm_for_keys(set(module_tensors)) is None:
            other |= {f"{name}.{k}": v for k, v in module_tensors.items()}
        else:
            modules[name] = module_tensors
    if not modules:
        raise UserError(f"{path} holds no LoRA, LoCon, LoHa or LoKr modules: it is not an "
                        "adapter file (a checkpoint or an embedding?).")
    dora = [n for n, t in modules.items() if "dora_scale" in t]
    if dora:
        raise UserError(
            f"{path} has {len(dora)} DoRA modules (dora_scale, e.g. {dora[0]}). A DoRA "
            "module rescales the merged weight by a magnitude, so its change depends on the "
            "base model and is not a low-rank delta to resize or add. Merge it into the "
            "model instead (python -m trainer merge-into).")
    factor_dtypes = Counter(t.dtype for m in modules.values() for k, t in m.items()
                            if k != "alpha")
    precision = DTYPE_PRECISIONS.get(factor_dtypes.most_common(1)[0][0], "fp32")
    return Adapter(path, modules, metadata, other, precision)


def file_dtype(name: str, module: dict[str, torch.Tensor], precision: str
               ) -> dict[str, torch.Tensor]:
    """A written module's file keys, cast at once: the output never sits in fp32."""
    dtype = SAVE_PRECISIONS[precision]
    return {f"{name}.{k}": v.detach().to(dtype) for k, v in module.items()}


def module_problem(path: Path, name: str, exc: Exception) -> UserError:
    return UserError(f"{path}: module {name} cannot be read: {exc}. The file is damaged or "
                     "not an SD adapter; check it with python -m networks inspect.")


def is_kxk(shape: tuple[int, ...]) -> bool:
    return len(shape) == 4 and tuple(shape[2:]) != (1, 1)


def fold_alpha(up: torch.Tensor, down: torch.Tensor, scale: float, rank: int,
               precision: str) -> dict[str, torch.Tensor]:
    """lora_up/lora_down/alpha with alpha = scale * rank, as kohya keeps the
    alpha / rank ratio; where the file's dtype cannot hold that alpha exactly,
    the scale goes into the factors instead (alpha = rank, scale 1)."""
    alpha = scale * rank
    dtype = SAVE_PRECISIONS[precision]
    if float(torch.tensor(alpha, dtype=dtype)) != alpha:
        root = abs(scale) ** 0.5
        up, down, alpha = up * (root if scale >= 0 else -root), down * root, float(rank)
    return {"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(alpha)}


def lora_header(source: dict[str, str], written: dict[str, tuple[int, float, bool]],
                dynamic: bool, tool: str, detail: str, comment: str) -> dict[str, str]:
    """The header of a LoRA/LoCon output. `written`: name -> (rank, alpha, k x k)."""
    def common(kxk: bool) -> tuple[str, str]:
        pairs = Counter((r, a) for r, a, k in written.values() if k == kxk)
        if dynamic or len(pairs) != 1:
            return ("Dynamic", "Dynamic") if pairs else ("", "")
        rank, alpha = pairs.most_common(1)[0][0]
        return str(rank), str(int(alpha) if float(alpha).is_integer() else alpha)

    conv = any(k for _, _, k in written.values())
    dim, alpha = common(False)
    if not dim:  # no Linear/1x1 module: the conv ranks are all the file has
        dim, alpha = common(True)
    args = {"algo": "lora"}
    if conv:
        conv_dim, conv_alpha = common(True)
        args = {"algo": "locon", "conv_dim": conv_dim, "conv_alpha": conv_alpha}
    updates = {
        "ss_network_module": "lycoris.kohya" if conv else "networks.lora",
        "ss_network_dim": dim, "ss_network_alpha": alpha, "ss_network_args": json.dumps(args),
        "ss_training_comment": f"{comment}; {source.get('ss_training_comment', '')}".rstrip("; "),
    }
    if not written:  # no LoRA module written (a merge that kept LyCORIS modules only)
        updates = {"ss_training_comment": updates["ss_training_comment"]}
    return carried_metadata(source, updates, tool, detail)


# --- resize --------------------------------------------------------------

@dataclass(frozen=True)
class RankRule:
    rank: int | None = None  # fixed rank, or the cap of a dynamic one
    conv_rank: int | None = None  # for k x k convs; None: as `rank`
    method: str | None = None  # a networks.lowrank.DYNAMIC_METHODS name
    value: float = 0.0

    def describe(self) -> str:
        conv = f", conv rank {self.conv_rank}" if self.conv_rank else ""
        if self.method:
            cap = f", max rank {self.rank}" if self.rank else ""
            return f"dynamic {self.method} {self.value:g}{cap}{conv}"
        return f"rank {self.rank}{conv}"


def module_svd(name: str, tensors: dict[str, torch.Tensor]):
    """(u, s, vh, scale, old rank, weight shape) of a module's unscaled delta:
    from low-rank factors where the algorithm has them (no full-size product),
    else by full SVD."""
    shape = weight_shape_for(name, tensors)
    module = file_module(tensors, shape, name)
    # An alpha of 0 (a zero delta) or below has no ratio worth keeping: scale 1.
    scale = module.scale if module.scale > 0 else 1.0
    factors = delta_factors(module)
    if factors is not None:
        u, s, vh = factored_svd(factors[0] * (module.scale / scale), factors[1])
    else:
        u, s, vh = svd(module.scaled_delta() / scale)
    return u, s, vh, scale, module.rank, shape


def resize_module(name: str, tensors: dict[str, torch.Tensor], rule: RankRule,
                  precision: str) -> tuple[dict[str, torch.Tensor], ModuleResize, bool]:
    u, s, vh, scale, old_rank, shape = module_svd(name, tensors)
    kxk = is_kxk(shape)
    cap = (rule.conv_rank or rule.rank) if kxk else rule.rank
    if rule.method:
        new_rank = dynamic_rank(s, rule.method, rule.value, cap or u.shape[1])
    else:
        new_rank = cap
    lr = from_svd(u, s, vh, new_rank, shape)
    out = fold_alpha(lr.up, lr.down, scale, lr.rank, precision)
    return out, ModuleResize(name, old_rank, lr.rank, lr.kept_fraction, lr.error * scale), kxk


def resize_file(path: str | os.PathLike, out: str | os.PathLike, rule: RankRule,
                precision: str | None = None, progress: bool = True) -> ResizeReport:
    adapter = read_adapter(path)
    out = check_out_path(out, [adapter.path])
    precision = precision or adapter.precision
    tensors: dict[str, torch.Tensor] = dict(adapter.other)
    modules, written = [], {}
    total = len(adapter.modules)
    algorithms = Counter(algorithm_for_keys(set(t)).name for t in adapter.modules.values())
    for done, name in enumerate(sorted(adapter.modules), 1):
        module_tensors = adapter.modules.pop(name)  # freed as it goes: one module in fp32
        try:
            new, info, kxk = resize_module(name, module_tensors, rule, precision)
        except ValueError as exc:  # a NotAdditive is one too
            raise module_problem(adapter.path, name, exc) from None
        tensors |= file_dtype(name, new, precision)
        modules.append(info)
        written[name] = (info.new_rank, float(new["alpha"]), kxk)
        if progress:
            report(done, total, name)
    comment = _comment(rule, Counter(m.old_rank for m in modules).most_common(1)[0][0])
    meta = lora_header(adapter.metadata, written, bool(rule.method), "resize",
                       f"{adapter.path.name}: {rule.describe()}", comment)
    save_network_file(out, tensors, meta, precision)
    summary = _summary(adapter, algorithms, modules, out, precision)
    return ResizeReport(modules, str(out), summary)


def _comment(rule: RankRule, old_rank: int) -> str:
    """kohya's `ss_training_comment` prefix for a resized file."""
    if rule.method:
        return f"Dynamic resize with {rule.method}: {rule.value:g} from {old_rank}"
    conv = f" (conv: {rule.conv_rank})" if rule.conv_rank else ""
    return f"dimension is resized from {old_rank} to {rule.rank}{conv}"


def _summary(adapter: Adapter, algorithms: Counter, modules: list[ModuleResize], out: Path,
             precision: str) -> dict:
    kept = [m.kept_fraction for m in modules]
    return {
        "modules": len(modules),
        "mean_kept_fraction": sum(kept) / len(kept),
        "min_kept_fraction": min(kept),
        "input_algorithms": dict(algorithms),
        "converted_to_lora": sum(n for a, n in algorithms.items() if a not in ("lora", "locon")),
        "unknown_tensors_copied": len(adapter.other),
        "precision": precision,
        "size_before": adapter.path.stat().st_size,
        "size_after": out.stat().st_size,
    }
