"""Content identity of model weights, used in cache keys (file bytes: core.hashing)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch


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
