"""Reading and editing the metadata of a .safetensors file without torch.

The file is an 8-byte little-endian header length, a JSON header (tensor
offsets are relative to the data after it, and `__metadata__` holds string
pairs), then the tensor data. Editing rewrites the header and copies the
data byte for byte, so the `sshs_*` hashes, which cover the data only
(networks/hashes.py), stay valid.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from pathlib import Path

from core.atomic import atomic_writer
from core.errors import UserError

MAX_HEADER = 100 * 1024 * 1024  # the limit safetensors itself enforces
ALIGN = 8  # safetensors pads the header with spaces so the data starts aligned
# kohya/LyCORIS adapter tensor names: `<prefix><module>.<tensor>`. A base model,
# a training state or any other file has other names, so the page never hands
# out, copies or edits one as if it were an adapter.
_ADAPTER_KEY = re.compile(
    r"(lora_unet|lora_te[12]?|lycoris)_[A-Za-z0-9_]+\."
    r"(lora_(down|up|mid)\.weight|alpha|dora_scale|scale|hada_w[12]_[ab]|hada_t[12]"
    r"|lokr_w[12](_[ab])?|lokr_t[12]|diff|diff_b|oft_(blocks|diag)|rescale|[wb]_norm)")


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """(the JSON header, the offset where tensor data starts)."""
    path = Path(path)
    try:
        with open(path, "rb") as file:
            raw_length = file.read(8)
            if len(raw_length) < 8:
                raise UserError(f"{path.name} is too short to be a .safetensors file.")
            (length,) = struct.unpack("<Q", raw_length)
            if length > MAX_HEADER or length > path.stat().st_size - 8:
                raise UserError(f"{path.name} is not a .safetensors file (bad header length).")
            header = json.loads(file.read(length))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path.name} is not a .safetensors file (unreadable header).") from None
    if not isinstance(header, dict):
        raise UserError(f"{path.name} is not a .safetensors file (the header is not a table).")
    return header, 8 + length


def adapter_problem(path: str | os.PathLike) -> str | None:
    """Why `path` is not a LoRA/LyCORIS adapter file, or None if it is one."""
    path = Path(path)
    try:
        header, data_start = read_header(path)
        size = path.stat().st_size
    except UserError:
        return "it is not a .safetensors file"
    except OSError as error:
        return f"it cannot be read: {error.strerror or error}"
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if not tensors:
        return "it holds no tensors"
    for key, info in tensors.items():
        if not _ADAPTER_KEY.fullmatch(key):
            return f"its tensor {key[:80]!r} is not a LoRA/LyCORIS tensor name"
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) for o in offsets)):
            return f"the header entry of {key[:80]!r} has no valid data_offsets"
    end = max(info["data_offsets"][1] for info in tensors.values())
    if data_start + end != size:
        return f"the header describes {data_start + end} bytes but the file has {size}"
    return None


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    return dict(read_header(path)[0].get("__metadata__") or {})


def update_metadata(path: str | os.PathLike, changes: dict[str, str]) -> None:
    """Set metadata keys (an empty value removes the key); atomic: a crash
    leaves the old file or the new one."""
    path = Path(path)
    header, data_start = read_header(path)
    metadata = dict(header.get("__metadata__") or {})
    for key, value in changes.items():
        if value:
            metadata[key] = str(value)
        else:
            metadata.pop(key, None)
    header["__metadata__"] = metadata
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    encoded += b" " * (-len(encoded) % ALIGN)
    with atomic_writer(path) as out, open(path, "rb") as source:
        out.write(struct.pack("<Q", len(encoded)) + encoded)
        source.seek(data_start)
        shutil.copyfileobj(source, out, 1 << 20)
