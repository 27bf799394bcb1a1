"""Content identities used in cache keys: file bytes and model weights."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes (the identity of an image, whatever its name or date)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def module_identity(module: torch.nn.Module) -> str:
    """SHA-256 over a model's config and every weight: a VAE identity for the latent cache.

    Costs one pass over the weights (well under a second for the SD VAE); a
    caller that already knows a checkpoint hash may pass that instead.
    """
    h = hashlib.sha256()
    config: Any = getattr(module, "config", None)
    if config is not None:
        h.update(json.dumps(dict(config), sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
