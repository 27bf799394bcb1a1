"""SHA-256 of a file's bytes, streamed: one helper for every file identity
(AutoV2 / `ss_new_sd_model_hash` of a base model, an image in the caches)."""

from __future__ import annotations

import hashlib
import os

CHUNK = 1 << 20


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()
