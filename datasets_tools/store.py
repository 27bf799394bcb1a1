"""Key -> tensors storage, in memory or as safetensors files, that never serves a bad entry.

On disk an entry is written to a temporary file and renamed into place, so a
crash leaves either the old state or the complete new file. On read the stored
key, format tag and a SHA-256 of every tensor's bytes are checked; anything
truncated, corrupt or written for another key is deleted and reported as a
miss, so the caller simply rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from core.atomic import atomic_write_bytes

_HEADER_LEN = struct.Struct("<Q")


class TensorStore:
    def __init__(self, directory: str | os.PathLike[str] | None, kind: str) -> None:
        """`directory` None keeps entries in memory; `kind` tags files (e.g. "latent-v1")."""
        self.kind = kind
        self.directory = Path(directory) if directory is not None else None
        self._memory: dict[str, dict[str, torch.Tensor]] = {}
        self.discarded = 0  # bad files found and deleted since creation
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)

    def path_for(self, key: str) -> Path:
        if self.directory is None:
            raise ValueError("an in-memory store has no files")
        return self.directory / f"{key}.safetensors"

    def load(self, key: str) -> dict[str, torch.Tensor] | None:
        if self.directory is None:
            return self._memory.get(key)
        path = self.path_for(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError:
            return self._discard(path)
        tensors = self._decode(data, key)
        return tensors if tensors is not None else self._discard(path)

    def save(self, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        if self.directory is None:
            self._memory[key] = tensors
            return
        metadata = dict(meta, key=key, kind=self.kind, digest=_digest(tensors))
        payload = save_tensors(tensors, metadata=metadata)
        atomic_write_bytes(self.path_for(key), payload)

    def _decode(self, data: bytes, key: str) -> dict[str, torch.Tensor] | None:
        try:
            (header_len,) = _HEADER_LEN.unpack_from(data)
            header = json.loads(data[8:8 + header_len])
            metadata = header.get("__metadata__") or {}
            if metadata.get("key") != key or metadata.get("kind") != self.kind:
                return None
            tensors = load_tensors(data)
        except (struct.error, ValueError, UnicodeDecodeError, AttributeError, SafetensorError):
            return None  # truncated or garbled: header or payload does not parse
        if metadata.get("digest") != _digest(tensors):
            return None  # bytes changed after writing
        return tensors

    def _discard(self, path: Path) -> None:
        self.discarded += 1
        path.unlink(missing_ok=True)
        return None


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        # Raw bytes through uint8 view: works for every dtype, bfloat16 included.
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
