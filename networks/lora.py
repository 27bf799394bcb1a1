"""LoRA and LoCon: delta W = up @ down (Hu et al. 2021, arXiv:2106.09685).

LoCon is the same module placed on 3x3 convolutions too (LyCORIS, arXiv:2309.14859):
`down` is a k x k conv with the base layer's stride/padding and `up` a 1x1 conv.
The optional Tucker form splits the k x k part into 1x1 down, k x k mid, 1x1 up.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterModule, Dropout


def lora_delta_weight(
    down: torch.Tensor, up: torch.Tensor, mid: torch.Tensor | None = None
) -> torch.Tensor:
    """Unscaled delta W from file-layout tensors (FORMATS.md section 3).

    down (r, in[, k, k]), up (out, r[, 1, 1]) -> (out, in[, k, k]);
    Tucker: down (r, in, 1, 1), mid (r, r, k, k), up (out, r, 1, 1).
    """
    if mid is None:
        delta = up.flatten(1) @ down.flatten(1)
        return delta.reshape(up.shape[0], *down.shape[1:])
    return torch.einsum("o r, r s h w, s i -> o i h w", up.flatten(1), mid, down.flatten(1))


class LoRAModule(AdapterModule):
    """LoRA on a Linear or 1x1 conv, LoCon on a k x k conv."""

    algorithm = "lora"

    def __init__(
        self,
        lora_name: str,
        base: nn.Module,
        rank: int,
        alpha: float,
        dropout: Dropout = Dropout(),
        tucker: bool = False,
    ):
        super().__init__(lora_name, base, rank, alpha, dropout)
        if isinstance(base, nn.Linear):
            self.lora_down = nn.Linear(base.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, base.out_features, bias=False)
        else:
            kernel = base.kernel_size
            conv = dict(stride=base.stride, padding=base.padding, dilation=base.dilation)
            if tucker and kernel != (1, 1):
                self.lora_down = nn.Conv2d(base.in_channels, rank, 1, bias=False)
                self.lora_mid = nn.Conv2d(rank, rank, kernel, bias=False, **conv)
            else:
                self.lora_down = nn.Conv2d(base.in_channels, rank, kernel, bias=False, **conv)
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        self.reset_parameters()

    @property
    def tucker(self) -> bool:
        return hasattr(self, "lora_mid")

    def reset_parameters(self) -> None:
        """Kaiming-uniform down, zero up: the delta starts at exactly 0."""
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        if self.tucker:
            nn.init.kaiming_uniform_(self.lora_mid.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    def delta_weight(self) -> torch.Tensor:
        mid = self.lora_mid.weight if self.tucker else None
        return lora_delta_weight(self.lora_down.weight, self.lora_up.weight, mid)

    def delta_forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        hidden = self.lora_down(x)
        if self.tucker:
            hidden = self.lora_mid(hidden)
        if self.training and self.dropout.neuron:
            hidden = F.dropout(hidden, self.dropout.neuron)
        channel_dim = -1 if isinstance(self.base, nn.Linear) else 1
        hidden = self._drop_ranks(hidden, channel_dim)
        return self.lora_up(hidden * scale if scale != 1 else hidden)

    # --- file format ----------------------------------------------------
    @staticmethod
    def recognises(suffixes: set[str]) -> bool:
        return {"lora_down.weight", "lora_up.weight"} <= suffixes

    @classmethod
    def from_tensors(
        cls, lora_name: str, base: nn.Module, tensors: dict[str, torch.Tensor], dropout: Dropout
    ) -> LoRAModule:
        down = tensors["lora_down.weight"]
        rank = down.shape[0]
        alpha = float(tensors["alpha"]) if "alpha" in tensors else rank
        module = cls(lora_name, base, rank, alpha, dropout, tucker="lora_mid.weight" in tensors)
        module.load_file_tensors(tensors)
        return module
