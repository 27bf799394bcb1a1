"""Data parallel across processes: gradients and values summed over them.

Every process walks the same global batches and trains on its own slice; the
loss of a slice is its share of the global mean, so summing the gradients
across processes gives exactly the single-process gradient.
"""

from __future__ import annotations

import torch

from trainer.stop_flag import StopFlag


def sync_gradients(network, world: int) -> None:
    if world == 1:
        return
    params = [p for p in network.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    torch.distributed.all_reduce(flat)
    offset = 0
    for param in params:
        n = param.numel()
        param.grad = flat[offset : offset + n].view_as(param).clone()
        offset += n


def sum_across(value: torch.Tensor, world: int) -> torch.Tensor:
    """The sum over processes, left on the device (no read-back)."""
    if world == 1:
        return value
    total = value.detach().double().clone()
    torch.distributed.all_reduce(total)
    return total


def stop_requested(stop: StopFlag, world: int, device) -> bool:
    """Every process stops at the same step, even if only one got the signal."""
    if world == 1:
        return stop.requested
    return float(sum_across(torch.tensor(float(stop.requested), device=device), world)) > 0
