"""The Tools tab's LoRA tools without Gradio: each tool's command line from
the form's values, refused with the reason before anything runs
(gui/tool_runs.py runs it).

The tools are the CLI verbs (`python -m networks resize|merge|convert`,
`python -m trainer merge-into|extract|import-kohya`); they import torch, the
page never does. The page writes only into the data folder: adapters into
`outputs/tools/` (where the Export tab lists them), merged models into
`models/`, imported presets into `presets/` (the Train tab's "(mine)" list).
Tool runs do not go through the job queue (gui/jobs.py), which runs
`trainer train` jobs with resumable run folders; a tool is one child that
ends in seconds to minutes, followed by the page that started it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import UserError
from gui import paths
from gui.cli_runs import python_module
from gui.datadir import DataDirs, safe_name
from gui.safetensors_meta import adapter_problem
from trainer.config import preset_paths

TOOLS_DIR = "tools"  # under outputs/: the Export tab lists every adapter there
MODELS_DIR = "models"  # under the data folder: merged checkpoints are no adapters
PRECISIONS = ("fp16", "bf16", "fp32")
DYNAMIC = {"sv_ratio": "the ratio of the largest singular value to the smallest kept, e.g. 4",
           "sv_fro": "the share of the Frobenius norm to keep, above 0 and at most 1, e.g. 0.9",
           "sv_cumulative": "the share of the singular values' sum to keep, above 0 and at "
                            "most 1, e.g. 0.9"}


@dataclass(frozen=True)
class Planned:
    """One tool run: the child's command line and what it will write."""

    tool: str
    command: list[str]
    out: Path
    what: str  # "Resizing": the start of the messages about this run
    kind: str  # "adapter", "model" or "preset"


def cli(module: str, *args: str) -> list[str]:
    """The child's command line (the tests point it at a fake tool)."""
    return python_module(module, *args)


# --- reading the form ----------------------------------------------------------
def text_of(value: Any) -> str:
    return "" if value is None else str(value).strip()


def number(value: Any, label: str, whole: bool = False, required: bool = True,
           above: float = 0.0) -> int | float | None:
    """The number in a box; None for an empty optional one."""
    text = text_of(value)
    if not text:
        if required:
            raise UserError(f"{label} is empty; enter {'a whole number' if whole else 'a number'}.")
        return None
    try:
        found = float(text)
        if not math.isfinite(found) or (whole and not found.is_integer()):
            raise ValueError(text)
    except ValueError:
        what = "a whole number such as 8" if whole else "a number such as 0.5"
        raise UserError(f"{label} {text!r} is not {what}.") from None
    if found <= above:
        raise UserError(f"{label} {text} must be above {above:g}.")
    return int(found) if whole else found


def adapter_input(value: Any, label: str) -> Path:
    """An existing LoRA/LyCORIS file (by its header), resolved."""
    if not text_of(value):
        raise UserError(f"{label}: pick an adapter from the list, upload one or type its path.")
    return paths.adapter_file(text_of(value), f"{label} takes a LoRA/LyCORIS .safetensors file")


def weighted_adapters(text: Any, label: str, least: int) -> list[tuple[Path, float | None]]:
    """`FILE` or `FILE:WEIGHT`, one per line, each an adapter file."""
    found = []
    for line in filter(None, (raw.strip() for raw in text_of(text).splitlines())):
        file, weight = line, None
        if not Path(line).is_file() and ":" in line:
            file, _, given = line.rpartition(":")
            weight = number(given, f"{label}: the weight of {file}", above=-math.inf)
        found.append((adapter_input(file, label), weight))
    if len(found) < least:
        files = f"{least} adapter file{'s' if least > 1 else ''}"
        raise UserError(f"{label}: enter at least {files}, one per line as FILE or "
                        "FILE:WEIGHT (pick them from the list to add them).")
    return found


def with_weight(path: Path, weight: float | None) -> str:
    return str(path) if weight is None else f"{path}:{weight:g}"


def model_input(value: Any, label: str) -> Path:
    """A base model: an existing .safetensors file or diffusers folder."""
    text = text_of(value)
    if not text:
        raise UserError(f"{label}: enter an SD 1.x .safetensors file or a diffusers folder.")
    path = Path(text).expanduser()
    if not path.exists():
        raise UserError(f"{label}: {path} does not exist; enter an SD 1.x .safetensors file or "
                        "a diffusers folder (on the machine running this app).")
    return path.resolve()


def precision_args(value: Any) -> list[str]:
    text = text_of(value)
    if not text:
        return []  # the tool's default
    if text not in PRECISIONS:
        raise UserError(f"Precision {text!r} is not one of {', '.join(PRECISIONS)}.")
    return ["--precision", text]


def output_path(folder: Path, name: Any, fallback: str, suffix: str, inputs: list[Path],
                overwrite: bool, kind: str = "adapter") -> Path:
    """Where a tool writes in the data folder: never over one of its inputs,
    over an existing file only with Overwrite, and never over a file that is
    not what the tool makes."""
    text = text_of(name)
    if text.lower().endswith(suffix) and suffix:
        text = text[: -len(suffix)]
    target = folder / f"{safe_name(text, fallback)}{suffix}"
    resolved = target.resolve()
    if any(resolved == Path(p).resolve() for p in inputs):
        raise UserError(f"The output {target.name} would overwrite the input {target}; enter "
                        "another output name.")
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise UserError(f"{target} already exists; enter another output name, or tick "
                            "'Overwrite' to replace it.")
        unlike = target.is_symlink() or (kind == "adapter" and adapter_problem(target))
        if unlike or (kind != "model" and not target.is_file()):
            raise UserError(f"{target} exists and is not a file this tool writes; it is never "
                            "replaced, even with 'Overwrite'. Enter another output name.")
    return target


def tools_folder(dirs: DataDirs) -> Path:
    return dirs.outputs / TOOLS_DIR


def models_folder(dirs: DataDirs) -> Path:
    return dirs.root / MODELS_DIR


# --- one planner per tool --------------------------------------------------------
def plan_resize(v: Mapping[str, Any], dirs: DataDirs) -> Planned:
    source = adapter_input(v.get("file"), "Resize")
    method = text_of(v.get("method")) or "rank"
    if method == "rank":
        rank = number(v.get("rank"), "Rank", whole=True)
        args, fallback = ["--rank", str(rank)], f"{source.stem}-r{rank}"
    elif method in DYNAMIC:
        value = number(v.get("value"), f"The {method} value ({DYNAMIC[method]})")
        if method != "sv_ratio" and value > 1:
            raise UserError(f"The {method} value {value:g} is above 1; enter {DYNAMIC[method]}.")
        if method == "sv_ratio" and value < 1:
            raise UserError(f"The sv_ratio value {value:g} is below 1; enter {DYNAMIC[method]}.")
        args = ["--dynamic", method, "--value", f"{value:g}"]
        rank = number(v.get("rank"), "Largest rank", whole=True, required=False)
        args += ["--rank", str(rank)] if rank else []
        fallback = f"{source.stem}-{method.replace('_', '-')}{value:g}"
    else:
        raise UserError(f"Method {method!r} is not a fixed rank or one of {', '.join(DYNAMIC)}.")
    conv = number(v.get("conv_rank"), "Conv rank", whole=True, required=False)
    args += ["--conv-rank", str(conv)] if conv else []
    out = output_path(tools_folder(dirs), v.get("name"), fallback, ".safetensors", [source],
                      bool(v.get("overwrite")))
    command = cli("networks", "resize", str(source), *args, "--out", str(out),
                  *precision_args(v.get("precision")))
    return Planned("resize", command, out, "Resizing", "adapter")


def plan_merge(v: Mapping[str, Any], dirs: DataDirs) -> Planned:
    sources = weighted_adapters(v.get("files"), "Merge", least=2)
    rank = number(v.get("rank"), "Rank", whole=True, required=False)
    conv = number(v.get("conv_rank"), "Conv rank", whole=True, required=False)
    if conv and not rank:
        raise UserError("Merge: a conv rank needs a rank too (without one the merge is exact, "
                        "every rank kept); enter the rank, or empty the conv rank.")
    out = output_path(tools_folder(dirs), v.get("name"), f"{sources[0][0].stem}-merged",
                      ".safetensors", [p for p, _ in sources], bool(v.get("overwrite")))
    command = cli("networks", "merge", *(with_weight(p, w) for p, w in sources),
                  "--out", str(out), *(["--rank", str(rank)] if rank else []),
                  *(["--conv-rank", str(conv)] if conv else []),
                  *precision_args(v.get("precision")))
    return Planned("merge", command, out, "Merging the adapters", "adapter")


def plan_convert(v: Mapping[str, Any], dirs: DataDirs) -> Planned:
    text = text_of(v.get("file"))
    if not text:
        raise UserError("Convert: pick, upload or type the file (or diffusers/PEFT folder) to "
                        "convert.")
    source = Path(text).expanduser()
    if not source.exists():
        raise UserError(f"Convert: {source} does not exist; enter an adapter file or folder.")
    source = source.resolve()
    out = output_path(tools_folder(dirs), v.get("name"), f"{source.stem}-kohya", ".safetensors",
                      [source], bool(v.get("overwrite")))
    command = cli("networks", "convert", str(source), "--out", str(out),
                  *precision_args(v.get("precision")),
                  *(["--drop-unknown"] if v.get("drop_unknown") else []))
    return Planned("convert", command, out, "Converting", "adapter")


def plan_merge_into(v: Mapping[str, Any], dirs: DataDirs) -> Planned:
    model = model_input(v.get("model"), "Merge into a model: the base model")
    sources = weighted_adapters(v.get("files"), "Merge into a model", least=1)
    diffusers = bool(v.get("diffusers"))
    out = output_path(models_folder(dirs), v.get("name"), f"{model.stem}-{sources[0][0].stem}",
                      "" if diffusers else ".safetensors", [model, *(p for p, _ in sources)],
                      bool(v.get("overwrite")), kind="model")
    command = cli("trainer", "merge-into", "--model", str(model),
                  *[arg for p, w in sources for arg in ("--lora", with_weight(p, w))],
                  "--out", str(out), *precision_args(v.get("precision")),
                  *(["--diffusers"] if diffusers else []))
    return Planned("merge-into", command, out, "Merging into the model", "model")


def plan_extract(v: Mapping[str, Any], dirs: DataDirs) -> Planned:
    base = model_input(v.get("base"), "Extract: the base model")
    tuned = model_input(v.get("tuned"), "Extract: the fine-tuned model")
    if base == tuned:
        raise UserError("Extract: the base and the fine-tuned model are the same; the "
                        "difference would be zero. Enter the model the fine-tune started from "
                        "as the base.")
    rank = number(v.get("rank"), "Rank", whole=True)
    conv = number(v.get("conv_rank"), "Conv rank", whole=True, required=False)
    out = output_path(tools_folder(dirs), v.get("name"), f"{tuned.stem}-extracted-r{rank}",
                      ".safetensors", [base, tuned], bool(v.get("overwrite")))
    command = cli("trainer", "extract", "--base", str(base), "--tuned", str(tuned),
                  "--rank", str(rank), *(["--conv-rank", str(conv)] if conv else []),
                  "--out", str(out), *precision_args(v.get("precision")))
    return Planned("extract", command, out, "Extracting", "adapter")


def plan_import(v: Mapping[str, Any], dirs: DataDirs) -> Planned:
    source = existing_file(v.get("file"), "Import kohya", "a kohya_ss GUI .json or an "
                           "sd-scripts training or dataset .toml")
    dataset = existing_file(v.get("dataset_config"), "Import kohya: the dataset config",
                            "an sd-scripts dataset .toml", required=False)
    if safe_name(text_of(v.get("name")).removesuffix(".toml"), source.stem) in preset_paths():
        raise UserError("Import kohya: that is the name of a bundled preset; enter another "
                        "output name.")
    overwrite = bool(v.get("overwrite"))
    out = output_path(dirs.presets, v.get("name"), source.stem, ".toml",
                      [source, *([dataset] if dataset else [])], overwrite, kind="preset")
    command = cli("trainer", "import-kohya", str(source), "--out", str(out),
                  *(["--dataset-config", str(dataset)] if dataset else []),
                  *(["--force"] if overwrite and out.exists() else []))
    return Planned("import-kohya", command, out, "Importing the kohya config", "preset")


def existing_file(value: Any, label: str, what: str, required: bool = True) -> Path | None:
    text = text_of(value)
    if not text and not required:
        return None
    path = Path(text).expanduser()
    if not text:
        raise UserError(f"{label}: upload or type the path of {what}.")
    if not path.is_file():
        raise UserError(f"{label}: {path} is not a file; upload or type the path of {what}.")
    return path.resolve()


# tool -> (label in the selector, planner)
TOOLS: dict[str, tuple[str, Callable[[Mapping[str, Any], DataDirs], Planned]]] = {
    "resize": ("Resize an adapter (lower its rank)", plan_resize),
    "merge": ("Merge adapters into one adapter", plan_merge),
    "convert": ("Convert an adapter to kohya format", plan_convert),
    "merge-into": ("Merge adapters into a model (a new checkpoint)", plan_merge_into),
    "extract": ("Extract an adapter from a fine-tuned model", plan_extract),
    "import-kohya": ("Import a kohya config as a preset", plan_import),
}


def plan(tool: str, values: Mapping[str, Any], dirs: DataDirs) -> Planned:
    """The run of `tool` the form describes; UserError saying what to fix."""
    if tool not in TOOLS:
        raise UserError(f"Choose a tool first ({', '.join(TOOLS)}).")
    return TOOLS[tool][1](values, dirs)
