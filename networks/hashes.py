"""The hashes A1111's "additional networks" tooling and Civitai read
(kohya sd-scripts' `sshs_*` keys): both cover the tensor data only, not the header, so
they can be stored in the header itself."""

from __future__ import annotations

import hashlib
import struct


def tensor_data(file_bytes: bytes) -> memoryview:
    """The safetensors buffer after the 8-byte header length and the JSON header."""
    (header_len,) = struct.unpack("<Q", file_bytes[:8])
    return memoryview(file_bytes)[8 + header_len :]


def model_hash(data: bytes | memoryview) -> str:
    """`sshs_model_hash`: sha256 of the tensor data."""
    return hashlib.sha256(data).hexdigest()


def legacy_hash(data: bytes | memoryview) -> str:
    """`sshs_legacy_hash`: sha256 of 64 KiB at offset 1 MiB of the tensor data, 8 hex chars."""
    return hashlib.sha256(data[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
