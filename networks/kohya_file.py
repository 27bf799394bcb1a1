"""Reading and writing kohya-format adapter files."""

from __future__ import annotations

import os
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from core.atomic import DEFAULT_ADVICE, atomic_write_bytes
from core.errors import UserError

from .hashes import legacy_hash, model_hash, tensor_data

SAVE_PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def to_file_tensors(state_dict: dict[str, torch.Tensor], precision: str) -> dict[str, torch.Tensor]:
    """Cast for saving. `alpha` stays a 0-dim tensor like every loader expects."""
    if precision not in SAVE_PRECISIONS:
        raise UserError(f"save_precision {precision!r} is not one of {', '.join(SAVE_PRECISIONS)}.")
    dtype = SAVE_PRECISIONS[precision]
    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in state_dict.items()}


def serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """Bytes of the file, with `sshs_*` hashes of its tensor data in the header.

    The tensor data does not depend on the header, so hashing a first
    serialisation gives the hash of the final one.
    """
    data = tensor_data(safetensors.torch.save(tensors, metadata=metadata))
    hashed = {
        **metadata,
        "sshs_model_hash": model_hash(data),
        "sshs_legacy_hash": legacy_hash(data),
    }
    return safetensors.torch.save(tensors, metadata=hashed)


def save_network_file(
    path: str | os.PathLike,
    state_dict: dict[str, torch.Tensor],
    metadata: dict[str, str],
    precision: str = "fp16",
    advice: str = DEFAULT_ADVICE,
) -> None:
    """Write the file atomically; a failed write is a UserError ending in `advice`."""
    tensors = to_file_tensors(state_dict, precision)
    bad = [k for k, v in tensors.items() if not torch.isfinite(v.float()).all()]
    if bad:
        raise UserError(
            f"Not saving {path}: {len(bad)} tensors hold NaN/Inf values (e.g. {bad[0]}); "
            "the training diverged, lower the learning rate."
        )
    atomic_write_bytes(path, serialize(tensors, metadata), advice)


def read_network_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a `.safetensors` adapter file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist; expected a LoRA/LyCORIS .safetensors file.")
    if path.suffix != ".safetensors":
        raise UserError(f"{path} is not a .safetensors file; only safetensors adapters are read.")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (safetensors.SafetensorError, OSError, ValueError) as exc:
        raise UserError(
            f"{path} is not a readable safetensors file (truncated or corrupt: {exc})."
        ) from exc
    return tensors, metadata
