"""An sd-scripts dataset config (`[general]`, `[[datasets]]`,
`[[datasets.subsets]]`) for `import-kohya`.

kohya's dataset config names each folder (`image_dir`) with its repeats
(`num_repeats`, default 1) and class tokens, whatever the folder is called.
This trainer reads one folder, `dataset.path`, whose kohya `N_name`
subfolders repeat N times (or a folder itself named `N_name`; otherwise
`dataset.repeats`), and the same for `dataset.reg_path`. So:

- one subset: its folder is the path; when the folder is named `N_name` with
  another N than num_repeats, the name would win here, so the list says so
  and gives the exact rename; otherwise num_repeats becomes dataset.repeats
  (for reg images, which have no such setting, a rename to `N_name`);
- several subsets: their common parent is the path when every folder is
  already `<num_repeats>_<name>` in it; each one that is not gets a line with
  the `mv` command that makes it so.

The paths stay as the user's machine has them; the commands are the user's
to run. Options of the subsets that this trainer has once for the whole
dataset (caption_extension, keep_tokens...) are mapped when the subsets
agree; a subset that differs is listed.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from trainer.kohya_import_draft import Draft, number, unset

_REPEATS_FOLDER = re.compile(r"^(\d+)_(.+)$")  # the scanner's rule (datasets_tools/scan.py)
DATASET_KEYS = ("resolution", "batch_size", "enable_bucket", "min_bucket_reso",
                "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale")
FOLDER_KEYS = ("image_dir", "num_repeats", "is_reg", "class_tokens")


def looks_like_dataset_config(data: dict) -> bool:
    return isinstance(data.get("datasets"), list) or (
        isinstance(data.get("general"), dict) and "datasets" not in data
        and set(data) <= {"general", "datasets"})


def split_dataset_config(data: dict, draft: Draft) -> tuple[dict, list[dict]]:
    """(dataset-level options of the first [[datasets]], its subsets with the
    [general] and dataset values they inherit, as sd-scripts falls back)."""
    general = data.get("general", {}) if isinstance(data.get("general"), dict) else {}
    datasets = [d for d in data.get("datasets", []) if isinstance(d, dict)]
    for key in data:
        if key not in ("general", "datasets"):
            draft.skip(key, data[key], "not a dataset config table ([general], [[datasets]])")
    if not datasets:
        return dict(general), []
    for index, extra in enumerate(datasets[1:], 2):
        draft.skip(f"[[datasets]] number {index}", f"{len(extra.get('subsets', []))} subsets",
                   "this trainer has one dataset: only the first [[datasets]] is imported "
                   "(move these folders into it, or import them as a preset of their own)")
    first = datasets[0]
    level = {**general, **{k: v for k, v in first.items() if k != "subsets"}}
    subsets = [{**level, **s} for s in first.get("subsets", []) if isinstance(s, dict)]
    dataset_level = {k: v for k, v in level.items() if k in DATASET_KEYS}
    if "batch_size" in dataset_level:
        dataset_level["train_batch_size"] = dataset_level.pop("batch_size")
    return dataset_level, subsets


def subset_options(subsets: list[dict], draft: Draft) -> dict:
    """The per-subset options as one set, as this trainer has them: the first
    training subset's value; a subset that differs is listed."""
    ordered = sorted(subsets, key=lambda s: bool(s.get("is_reg")))
    merged: dict = {}
    for index, subset in enumerate(ordered):
        for key, value in subset.items():
            if key in FOLDER_KEYS or key in DATASET_KEYS:
                continue
            if key not in merged:
                merged[key] = value
            elif merged[key] != value:
                draft.skip(f"subset {subset.get('image_dir', index)} {key}", value,
                           f"this trainer has one {key} for every folder: the preset uses "
                           f"{merged[key]!r}")
    return merged


def map_folders(subsets: list[dict], draft: Draft) -> None:
    train = [s for s in subsets if not _is_reg(s)]
    reg = [s for s in subsets if _is_reg(s)]
    if not train:
        draft.skip("[[datasets.subsets]]", len(subsets), "no training subset (one without "
                   "is_reg = true): dataset.path is left for you to set")
    for group, key in ((train, "dataset.path"), (reg, "dataset.reg_path")):
        folders = [(s.get("image_dir"), _repeats(s, draft), s.get("class_tokens")) for s in group]
        folders = [f for f in folders if not unset(f[0]) and f[1] is not None]
        if len(folders) == 1:
            _one_folder(*folders[0], key, draft)
        elif folders:
            _several_folders(folders, key, draft)


def _is_reg(subset: dict) -> bool:
    return subset.get("is_reg") is True or str(subset.get("is_reg")).lower() == "true"


def _repeats(subset: dict, draft: Draft) -> int | None:
    raw = subset.get("num_repeats", 1)
    try:
        value = number(raw, int)
    except ValueError as exc:
        draft.skip(f"subset {subset.get('image_dir')} num_repeats", raw,
                   f"value not supported: {exc}")
        return None
    if value < 1:
        draft.skip(f"subset {subset.get('image_dir')} num_repeats", raw,
                   "at least 1 here; the folder is left out")
        return None
    return value


def _one_folder(folder: str, repeats: int, tokens, key: str, draft: Draft) -> None:
    name = _name(folder)
    match = _REPEATS_FOLDER.match(name)
    draft.set(key, folder, "image_dir", shown=f'{draft.prefix}image_dir = "{folder}"')
    label = str(tokens) if not unset(tokens) else (match[2] if match else name)
    if match and int(match[1]) != repeats:
        _rename(draft, folder, repeats, label, key,
                f"this trainer counts the folder name's {match[1]} repeats; kohya's dataset "
                f"config says {repeats}")
    elif not match and repeats > 1 and key == "dataset.path":
        draft.set("dataset.repeats", repeats, "num_repeats",
                  shown=f"{draft.prefix}num_repeats = {repeats}")
    elif not match and repeats > 1:
        _rename(draft, folder, repeats, label, key,
                "reg images repeat by their folder's N_name here")
    _class_tokens(draft, folder, tokens, match[2] if match else name, repeats, key)


def _several_folders(folders: list, key: str, draft: Draft) -> None:
    parent = _parent(folders[0][0])
    draft.set(key, parent, "image_dir",
              shown=f"{draft.prefix}the parent of the subsets' image_dir folders")
    for folder, repeats, tokens in folders:
        name = _name(folder)
        match = _REPEATS_FOLDER.match(name)
        label = str(tokens) if not unset(tokens) else (match[2] if match else name)
        if _parent(folder) != parent:
            _rename(draft, folder, repeats, label, key, f"this trainer reads one folder, {key} "
                    f'= "{parent}", and its N_name subfolders', keep_path=True)
        elif not (match and int(match[1]) == repeats):
            _rename(draft, folder, repeats, label, key, f"this trainer repeats the folders of "
                    f'"{parent}" by their N_name names; kohya says {repeats}', keep_path=True)
        else:
            _class_tokens(draft, folder, tokens, match[2], repeats, key)
    _other_folders(parent, folders, key, draft)


def _class_tokens(draft: Draft, folder: str, tokens, label: str, repeats: int, key: str) -> None:
    if unset(tokens) or str(tokens) == label:
        return
    draft.skip(f"subset {folder} class_tokens", tokens, "kohya captions the images without a "
               f'caption file with them; this trainer uses the folder\'s name "{label}": if '
               f"some images have no caption, rename it: {_move(folder, repeats, str(tokens))}"
               f" and set {key} to the new folder")


def _rename(draft: Draft, folder: str, repeats: int, label: str, key: str, why: str,
            keep_path: bool = False) -> None:
    then = "" if keep_path else f" and set {key} to the new folder"
    draft.skip(f"subset {folder} num_repeats", repeats,
               f"{why}: to train it as kohya does, run {_move(folder, repeats, label)}{then}")


def _move(folder: str, repeats: int, label: str) -> str:
    target = f"{_parent(folder)}{_separator(folder)}{repeats}_{label}"
    if "\\" in folder or re.match(r"^[A-Za-z]:", folder):
        return f'move "{folder}" "{target}"'  # a Windows path: cmd's own command
    return f"mv {shlex.quote(folder)} {shlex.quote(target)}"


def _other_folders(parent: str, folders: list, key: str, draft: Draft) -> None:
    try:
        present = sorted(p.name for p in Path(parent).iterdir() if p.is_dir())
    except OSError:
        return  # not on this machine: nothing to compare
    listed = {_name(f[0]) for f in folders if _parent(f[0]) == parent}
    extra = [name for name in present if name not in listed and not name.startswith(".")]
    if extra:
        draft.warn(f'{key} = "{parent}" also holds {", ".join(extra)}, which the dataset '
                   "config does not list: this trainer reads every folder in it")


def _separator(path: str) -> str:
    return "\\" if "\\" in path and "/" not in path else "/"


def _name(path: str) -> str:
    return re.split(r"[\\/]", path.rstrip("\\/"))[-1]


def _parent(path: str) -> str:
    trimmed = path.rstrip("\\/")
    cut = max(trimmed.rfind("/"), trimmed.rfind("\\"))
    return trimmed[:cut] if cut > 0 else ("/" if cut == 0 else ".")
