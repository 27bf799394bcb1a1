"""A `.safetensors` header read with json and struct only, and what it says
about the file: readable or not, adapter weights or something else.

Torch-free on purpose: the GUI and the config checks (`trainer.config_io`)
use it to refuse a checkpoint, a text file or a truncated download named as
an adapter before any model is loaded.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from core.errors import UserError

from .algorithms import ALGORITHMS, file_algorithm

# The safetensors library refuses larger headers; a bigger length field means
# the file is something else.
MAX_HEADER_BYTES = 100_000_000
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2,
    "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8,
}
# Module names our loader maps onto SD1.x layers; which tensors make a module of
# each kind is the registry's (`networks.algorithms`).
ADAPTER_PREFIXES = ("lora_unet_", "lora_te_")
_LABELS = [a.label.split(" (")[0] for a in ALGORITHMS.values()]
KINDS_TEXT = f"{', '.join(_LABELS[:-1])} or {_LABELS[-1]}"  # "LoRA, LoCon, LoHa or LoKr"


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class FileHeader:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


class UnreadableFile(UserError):
    """Not a readable safetensors file; `reason` completes "<the file> ..."."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path} {reason}.")
        self.path, self.reason = path, reason


def read_header(path: str | os.PathLike[str]) -> FileHeader:
    """The tensor names, dtypes, shapes and metadata of a safetensors file,
    checked the way the safetensors library checks them before reading data.

    Raises UnreadableFile saying what is wrong (missing, a folder, truncated,
    another format, a damaged header).
    """
    path = Path(path)
    if not path.exists():
        raise UnreadableFile(path, "does not exist")
    if path.is_dir():
        raise UnreadableFile(path, "is a folder, not a .safetensors file")
    try:
        with path.open("rb") as file:
            size = os.fstat(file.fileno()).st_size
            start = file.read(8)
            length = struct.unpack("<Q", start)[0] if len(start) == 8 else None
            if length is None or length > min(MAX_HEADER_BYTES, size - 8):
                raise UnreadableFile(path, _not_safetensors(start, length, size))
            raw = file.read(length)
    except OSError as exc:
        raise UnreadableFile(path, f"cannot be read ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict):
        raise UnreadableFile(path, "has a damaged header (not a JSON object): the file is "
                             "corrupt or not a safetensors file")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise UnreadableFile(path, "has a damaged header (its metadata is not text)")
    tensors, spans = {}, []
    for name, entry in header.items():
        info, span = _tensor_entry(entry)
        if info is None:
            raise UnreadableFile(path, f"has a damaged header (the entry of tensor {name!r} "
                                 "is not valid)")
        tensors[name] = info
        spans.append(span)
    spans.sort()
    # safetensors stores tensors back to back: a gap or an overlap is damage.
    if any(begin != end for (_, end), (begin, _) in zip([(0, 0), *spans], spans, strict=False)):
        raise UnreadableFile(path, "has a damaged header (its tensors overlap or leave gaps)")
    data_end, data_size = (spans[-1][1] if spans else 0), size - 8 - length
    if data_end != data_size:
        what = "is truncated" if data_end > data_size else "has bytes its header does not list"
        raise UnreadableFile(path, f"{what}: its header lists {data_end:,} bytes of tensor data, "
                             f"the file holds {data_size:,} (an interrupted download or copy?)")
    return FileHeader(tensors, metadata)


def _not_safetensors(start: bytes, length: int | None, size: int) -> str:
    if size == 0:
        return "is empty (0 bytes)"
    if start.startswith(b"PK\x03\x04") or start.startswith(b"\x80"):
        return "is a PyTorch pickle/zip file (.ckpt/.pt), not a .safetensors file"
    if length is None or length > MAX_HEADER_BYTES:
        return "is not a safetensors file (it does not start with a safetensors header)"
    return (f"is truncated or not a safetensors file: its header should be {length:,} bytes, "
            f"the file holds {size:,}")


def _tensor_entry(entry: object) -> tuple[TensorInfo | None, tuple[int, int]]:
    if not isinstance(entry, dict):
        return None, (0, 0)
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(dtype, str) and isinstance(shape, list) and isinstance(offsets, list)
            and all(_count(n) for n in shape) and len(offsets) == 2
            and all(_count(n) for n in offsets) and offsets[0] <= offsets[1]):
        return None, (0, 0)
    if dtype in DTYPE_BYTES and offsets[1] - offsets[0] != math.prod(shape) * DTYPE_BYTES[dtype]:
        return None, (0, 0)
    return TensorInfo(dtype, tuple(shape)), (offsets[0], offsets[1])


def _count(n: object) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 0


def group_modules(names: Iterable[str]) -> dict[str, set[str]]:
    """`module.suffix` tensor names -> {module: suffixes} (a suffix may hold dots)."""
    modules: dict[str, set[str]] = defaultdict(set)
    for name in names:
        module, _, suffix = name.partition(".")
        modules[module].add(suffix)
    return dict(modules)


def module_kind(suffixes: set[str]) -> str | None:
    """The algorithm whose module these tensors make ("lora" for LoCon too), else None."""
    algorithm = file_algorithm(suffixes)
    return None if algorithm is None else algorithm.name


def check_adapter_file(path: str | os.PathLike[str], setting: str, fix: str) -> FileHeader:
    """The header of `path` if it is an adapter file our loader can apply.

    Otherwise a UserError naming `setting` and the file, ending with `fix`
    (what to set instead).
    """
    try:
        header = read_header(path)
    except UnreadableFile as problem:
        raise UserError(f"{setting} = {problem.path} {problem.reason}; {fix}.") from None
    modules = group_modules(header.tensors)
    others = sorted(m for m, suffixes in modules.items()
                    if module_kind(suffixes) is None or not m.startswith(ADAPTER_PREFIXES))
    if not modules or len(others) == len(modules):
        example = f" (its tensors are named like {others[0]!r})" if others else ""
        raise UserError(
            f"{setting} = {Path(path)} is not an adapter file: it holds no {KINDS_TEXT} "
            f"weights in kohya naming{example}; a model checkpoint or another kind of file? "
            f"{fix[0].upper()}{fix[1:]}.")
    if others:
        raise UserError(
            f"{setting} = {Path(path)} holds {len(others)} modules that are not {KINDS_TEXT} "
            f"weights in kohya naming (e.g. {others[0]!r}), which our loader cannot "
            f"apply; {fix}.")
    return header
