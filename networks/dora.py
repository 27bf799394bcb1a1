"""DoRA's weight decomposition (Liu et al. 2024, arXiv:2402.09353), the tensor
math shared by every algorithm: W_dora = W' * m / ||W'||, W' = W + scale * delta W.

The magnitude m is stored as the file's `dora_scale` (LyCORIS `dora_wd`
layout): per input channel, the norm over the output and kernel dimensions,
shaped (1, in) or (1, in, 1, 1); or, with `on_output`, per output channel over
the rest, shaped (out, 1) or (out, 1, 1, 1). A1111 and ComfyUI apply the input axis
only; lycoris applies either.
"""

from __future__ import annotations

import torch

# As LyCORIS: keeps a zero column from dividing by zero, far below any real norm.
EPS = torch.finfo(torch.float32).eps


def magnitude_shape(weight_shape: torch.Size, on_output: bool) -> tuple[int, ...]:
    ones = [1] * (len(weight_shape) - 1)
    if on_output:
        return (weight_shape[0], *ones)
    return (1, weight_shape[1], *ones[1:])


def weight_norm(weight: torch.Tensor, on_output: bool) -> torch.Tensor:
    """||W|| per output row or per input column, shaped like the magnitude."""
    if on_output:
        norm = weight.flatten(1).norm(dim=1)
    else:
        norm = weight.transpose(0, 1).flatten(1).norm(dim=1)
    return norm.reshape(magnitude_shape(weight.shape, on_output))


def decompose(merged: torch.Tensor, magnitude: torch.Tensor, on_output: bool) -> torch.Tensor:
    """W' * m / ||W'||."""
    return merged * (magnitude / (weight_norm(merged, on_output) + EPS))


def axis_of(magnitude: torch.Tensor, weight_shape: torch.Size) -> bool:
    """Whether a file's `dora_scale` is per output channel; ValueError when its
    shape fits neither axis of the layer."""
    shape = tuple(magnitude.shape)
    if shape == magnitude_shape(weight_shape, on_output=False):
        return False
    if shape == magnitude_shape(weight_shape, on_output=True):
        return True
    raise ValueError(
        f"dora_scale has shape {shape}, which is neither per input channel "
        f"{magnitude_shape(weight_shape, False)} nor per output channel "
        f"{magnitude_shape(weight_shape, True)} of a layer of shape {tuple(weight_shape)}"
    )
