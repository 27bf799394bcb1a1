"""`python -m networks convert IN --out OUT.safetensors`: adapter files other
tools wrote, rewritten in the kohya layout every loader reads
(docs/FORMATS.md "Module names", "Tensors and scales").

The input kind is told from its keys: diffusers/PEFT LoRA keys
(`networks/convert_peft.py`; IN may be a PEFT `save_pretrained` folder) or
kohya-style names to repair (`networks/convert_kohya.py`: LDM U-Net names,
text-encoder names without `text_model_`, the `lycoris_` prefix). A key
neither understands is refused, or dropped with `drop_unknown`; the file is
written only whole (`save_network_file`).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from core.errors import UserError
from core.tool_progress import report

from .algorithms import file_algorithm
from .convert_kohya import SDXL_PREFIXES, rename_module
from .convert_peft import (
    TEXT_ENCODER,
    UNET,
    LoraConfigScale,
    configs_from_metadata,
    kohya_module,
    module_name,
    parse_key,
)
from .file_header import UnreadableFile, read_header
from .kohya_file import SAVE_PRECISIONS, read_network_file, save_network_file
from .network import group_by_module
from .registry import module_class
from .tool_metadata import carried_metadata

TOOL = "convert"
PEFT_WEIGHTS = ("adapter_model.safetensors", "pytorch_lora_weights.safetensors")
PEFT_CONFIG = "adapter_config.json"
DIFFUSERS_METADATA = "lora_adapter_metadata"
ARCHITECTURE = "stable-diffusion-v1/lora"
Progress = Callable[[int, int, str], None]


@dataclass
class Conversion:
    source: Path
    kind: str  # what the input was, in words
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: Counter = field(default_factory=Counter)  # modules per kind of change
    dropped: list[str] = field(default_factory=list)  # unknown keys left out
    notes: list[str] = field(default_factory=list)


def convert_file(
    source: str | os.PathLike, out: str | os.PathLike, precision: str | None = None,
    drop_unknown: bool = False, progress: Progress = report,
) -> Conversion:
    """Convert `source` (a file or a PEFT folder) and write `out` atomically."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise UserError(f"--out {out} must end in .safetensors: the converted adapter is a "
                        "safetensors file.")
    file, config = resolve_input(Path(source))
    if out.exists() and out.resolve() == file.resolve():
        raise UserError(f"--out {out} is the input file; choose another name, the input "
                        "is never overwritten.")
    tensors, metadata = _read(file)
    conversion = convert_tensors(file, tensors, metadata, config, progress)
    if conversion.dropped and not drop_unknown:
        raise UserError(
            f"{file}: {len(conversion.dropped)} keys name nothing this tool can map to an "
            f"SD 1.x LoRA layer (e.g. {conversion.dropped[0]!r}){_sdxl_hint(conversion.dropped)}. "
            "Nothing was written; pass --drop-unknown to write the file without them.")
    if not conversion.tensors:
        raise UserError(f"{file} holds no LoRA module this tool can convert; nothing was written.")
    meta = carried_metadata(metadata, _metadata_updates(conversion, metadata), TOOL,
                            conversion.kind)
    save_network_file(out, conversion.tensors, meta, precision or _source_precision(tensors))
    return conversion


def resolve_input(path: Path) -> tuple[Path, LoraConfigScale | None]:
    """The weights file, and the PEFT config that sets its scales if it has one."""
    if path.is_dir():
        found = next((path / n for n in PEFT_WEIGHTS if (path / n).is_file()), None)
        if found is None:
            pickles = sorted(p.name for p in path.glob("*.bin"))
            raise UserError(
                f"{path} is a folder without {' or '.join(PEFT_WEIGHTS)}"
                + (f" (it has {pickles[0]}, a pickle file this tool does not read: save "
                   "again with safe_serialization=True)" if pickles else "")
                + "; give a LoRA .safetensors file or a PEFT save_pretrained folder.")
        path = found
    config = None
    config_file = path.with_name(PEFT_CONFIG)
    if path.name == PEFT_WEIGHTS[0] and config_file.is_file():
        try:
            config = LoraConfigScale.from_dict(json.loads(config_file.read_text("utf-8")),
                                               str(config_file))
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            raise UserError(f"{config_file} is not a readable PEFT LoraConfig ({exc}).") from exc
    return path, config


def _read(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if file.is_file() and file.suffix == ".safetensors":
        try:
            read_header(file)
        except UnreadableFile as problem:
            raise UserError(f"{problem} Give a LoRA .safetensors file.") from None
    return read_network_file(file)


def convert_tensors(
    file: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
    config: LoraConfigScale | None, progress: Progress = report,
) -> Conversion:
    """The converted tensors; unknown keys listed in `dropped`."""
    peft_keys = {k: p for k in tensors if (p := parse_key(k)) and p.role != "alpha"}
    if peft_keys:
        return _convert_peft(file, tensors, metadata, config, progress)
    if any(k.startswith(("lora_", "lycoris_")) for k in tensors):
        return _convert_kohya(file, tensors, progress)
    example = next(iter(tensors), "none")
    raise UserError(f"{file} is not a LoRA file this tool knows: its keys (e.g. {example!r}) "
                    "are neither kohya's lora_unet_/lora_te_ names nor diffusers/PEFT LoRA keys.")


def _convert_kohya(file: Path, tensors: dict, progress: Progress) -> Conversion:
    conversion = Conversion(file, "")
    grouped = group_by_module(tensors)
    sources: dict[str, str] = {}
    for done, (name, parts) in enumerate(sorted(grouped.items()), 1):
        renamed = rename_module(name) if file_algorithm(set(parts)) else None
        if renamed is None:
            conversion.dropped += [f"{name}.{suffix}" for suffix in parts]
        else:
            new_name, kind = renamed
            _claim(sources, new_name, name, file)
            conversion.tensors |= {f"{new_name}.{s}": t for s, t in parts.items()}
            conversion.counts[kind] += 1
        progress(done, len(grouped), name)
    kinds = ", ".join(sorted(conversion.counts)) or "nothing to map"
    conversion.kind = f"kohya-style names ({kinds})"
    return conversion


def _convert_peft(
    file: Path, tensors: dict, metadata: dict[str, str], config: LoraConfigScale | None,
    progress: Progress,
) -> Conversion:
    configs, alpha_source = _peft_configs(file, tensors, metadata, config)
    layers: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    keys_of: dict[tuple[str, str], list[str]] = {}
    styles: Counter = Counter()
    conversion = Conversion(file, "")
    for key, tensor in tensors.items():
        parsed = parse_key(key)
        if parsed is None:
            conversion.dropped.append(key)
            continue
        layer = (parsed.component, parsed.path)
        if parsed.role in layers.setdefault(layer, {}):
            raise UserError(f"{file} holds two {parsed.role} tensors for the layer "
                            f"{parsed.path} ({keys_of[layer][0]!r} and {key!r}).")
        layers[layer][parsed.role] = tensor
        keys_of.setdefault(layer, []).append(key)
        styles[parsed.style] += bool(parsed.style)
    for done, ((component, path), parts) in enumerate(sorted(layers.items()), 1):
        name = module_name(component, path)
        if "down" in parts and "up" in parts:
            parsed = parse_key(keys_of[(component, path)][0])
            try:
                module = kohya_module(parsed, parts, configs.get(component))
            except ValueError as exc:
                raise UserError(f"{file}: layer {component}.{path}: {exc}.") from None
            conversion.tensors |= {f"{name}.{s}": t for s, t in module.items()}
            conversion.counts["U-Net LoRA" if component == UNET else "text-encoder LoRA"] += 1
            conversion.counts["with DoRA (output axis)"] += "dora_scale" in module
        else:
            conversion.dropped += keys_of[(component, path)]
        progress(done, len(layers), name)
    conversion.counts = +conversion.counts
    style = ", ".join(s for s, n in styles.most_common() if n)
    conversion.kind = f"diffusers/PEFT LoRA ({style} keys; alpha {alpha_source})"
    if conversion.counts["with DoRA (output axis)"]:
        conversion.notes.append(
            "DoRA per output channel (PEFT's axis): lycoris and this trainer apply it as "
            "trained; A1111 applies it wrongly and ComfyUI has an open bug for it.")
    return conversion


def _peft_configs(
    file: Path, tensors: dict, metadata: dict[str, str], config: LoraConfigScale | None
) -> tuple[dict[str, LoraConfigScale], str]:
    """Per component the config that sets the scales, and where alpha came from."""
    if config is not None:
        return {UNET: config, TEXT_ENCODER: config}, f"from {config.source}"
    if raw := metadata.get(DIFFUSERS_METADATA):
        try:
            configs = configs_from_metadata(json.loads(raw))
        except (ValueError, TypeError, AttributeError) as exc:
            raise UserError(f"{file}: its {DIFFUSERS_METADATA} header entry is not a "
                            f"LoraConfig ({exc}).") from None
        if configs:
            return configs, f"from the file's {DIFFUSERS_METADATA}"
    if any(k.endswith(".alpha") for k in tensors):
        return {}, "from its .alpha keys"
    return {}, "= rank (no alpha in the file: scale 1, as diffusers applies it)"


def _claim(sources: dict[str, str], new_name: str, old_name: str, file: Path) -> None:
    if new_name in sources:
        raise UserError(f"{file} holds two modules for the layer {new_name}: "
                        f"{sources[new_name]} and {old_name}; keep one of them.")
    sources[new_name] = old_name


def _sdxl_hint(keys: list[str]) -> str:
    if any(k.startswith(SDXL_PREFIXES) or k.startswith("text_encoder_2.") for k in keys):
        return " (SDXL's second text encoder: this tool converts SD 1.x files)"
    return ""


def _metadata_updates(conversion: Conversion, source: dict[str, str]) -> dict[str, str | None]:
    """The kohya keys a loader reads, filled where the source lacks them."""
    algorithms, ranks, alphas, dora, conv = Counter(), Counter(), Counter(), False, {}
    for name, parts in group_by_module(conversion.tensors).items():
        algorithm = file_algorithm(set(parts))
        rank, _ = module_class(algorithm.name).check_file_tensors(parts)
        alpha = float(parts["alpha"]) if "alpha" in parts else float(rank)
        algorithms[algorithm.name] += 1
        down = parts.get("lora_down.weight")
        if down is not None and down.dim() == 4 and down.shape[-1] > 1:
            conv[name] = (rank, alpha)
        else:
            ranks[rank] += 1
            alphas[alpha] += 1
        dora = dora or "dora_scale" in parts
    algorithm = algorithms.most_common(1)[0][0]
    args = {"algo": "locon" if algorithm == "lora" and conv else algorithm}
    if conv:
        rank, alpha = Counter(conv.values()).most_common(1)[0][0]
        args |= {"conv_dim": str(rank), "conv_alpha": _num(alpha)}
    if dora:
        args |= {"dora_wd": "True", "wd_on_output": str(_dora_on_output(conversion.tensors))}
    filled = {
        "ss_network_module": "networks.lora" if algorithm == "lora" and not dora
        else "lycoris.kohya",
        "ss_network_dim": str(ranks.most_common(1)[0][0] if ranks else args.get("conv_dim")),
        "ss_network_alpha": _num(alphas.most_common(1)[0][0]) if alphas
        else args.get("conv_alpha"),
        "ss_network_args": json.dumps(args),
        "modelspec.architecture": ARCHITECTURE,
    }
    updates: dict[str, str | None] = {k: v for k, v in filled.items() if k not in source}
    # diffusers reads this entry as the adapter's LoraConfig, and refuses a kohya
    # file that has it as well as alphas.
    updates[DIFFUSERS_METADATA] = None
    return updates


def _dora_on_output(tensors: dict[str, torch.Tensor]) -> bool:
    scale = next(t for k, t in tensors.items() if k.endswith(".dora_scale"))
    return scale.dim() >= 2 and scale.shape[1] == 1 and scale.shape[0] > 1


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _source_precision(tensors: dict[str, torch.Tensor]) -> str:
    """The precision most of the source's tensors have (fp32 for others)."""
    names = {dtype: name for name, dtype in SAVE_PRECISIONS.items()}
    counts = Counter(t.dtype for k, t in tensors.items() if not k.endswith(".alpha"))
    dtype = counts.most_common(1)[0][0] if counts else torch.float32
    return names.get(dtype, "fp32")
