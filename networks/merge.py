"""The one merge path: what adapters make of a layer's weight, folded in.

Every adapter module says what it does to a base weight (`merged_weight`,
DoRA included); this folds one or several of them into a layer in fp32 and
rounds once to the layer's dtype. `AdapterModule.merge`, the previews and
`python -m trainer sample` (`trainer.merge`) all come here. Several adapters on
one layer are each applied to the original weight and their changes summed,
as A1111 does; without DoRA that is the plain sum of the scaled deltas.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


@torch.no_grad()
def merged_layer_weight(weight: torch.Tensor, adapters: Sequence) -> torch.Tensor:
    """The merged weight in `weight`'s dtype; ValueError if it holds NaN/Inf."""
    base = weight.detach().float()
    merged = (base + sum(adapter.weight_update(base).float() for adapter in adapters)).to(
        weight.dtype
    )
    if not torch.isfinite(merged).all():
        raise ValueError("the merged weight holds NaN/Inf values")
    return merged


@torch.no_grad()
def merge_into_layer(weight: torch.Tensor, adapters: Sequence) -> None:
    """Overwrite `weight` with `merged_layer_weight` (unchanged when that fails)."""
    weight.copy_(merged_layer_weight(weight, adapters))
