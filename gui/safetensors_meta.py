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
import shutil
import struct
from pathlib import Path

from trainer.atomic import atomic_writer
from trainer.errors import UserError

MAX_HEADER = 100 * 1024 * 1024  # the limit safetensors itself enforces
ALIGN = 8  # safetensors pads the header with spaces so the data starts aligned


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


def copy_to_folder(path: str | os.PathLike, folder: str, overwrite: bool) -> Path:
    """Copy an adapter into e.g. A1111's or ComfyUI's models/Lora, atomically."""
    source = Path(path)
    target_dir = Path(folder.strip()).expanduser()
    if not folder.strip() or not target_dir.is_dir():
        raise UserError(f"{target_dir} is not an existing folder; enter e.g. "
                        "/path/to/stable-diffusion-webui/models/Lora.")
    target = target_dir / source.name
    if target.resolve() == source.resolve():
        raise UserError(f"{target} is the file itself; choose another folder.")
    if target.exists() and not overwrite:
        raise UserError(f"{target} already exists; tick 'Overwrite' to replace it.")
    with atomic_writer(target) as out, open(source, "rb") as data:
        shutil.copyfileobj(data, out, 1 << 20)
    return target
