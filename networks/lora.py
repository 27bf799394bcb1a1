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

from .base import AdapterModule, Dropout, first_dim, shape_text


def lora_delta_weight(
    down: torch.Tensor, up: torch.Tensor, mid: torch.Tensor | None = None
) -> torch.Tensor:
    """Unscaled delta W from file-layout tensors (kohya/LyCORIS layout).

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

    def dora_norm(self) -> torch.Tensor:
        """||W + s * up @ down|| per DoRA channel from rank-sized products only
        (W^T up and up^T up, or W down^T and down down^T): the squared norm is
        ||W||^2 + 2 s <W, up down> + s^2 ||up down||^2, channel by channel.
        Tucker kernels take the generic path (their delta is built once)."""
        if self.tucker:
            return super().dora_norm()
        with torch.no_grad():
            weight = self.base.weight
            up = self.lora_up.weight.flatten(1).float()  # (out, r)
            down = self.lora_down.weight.flatten(1).float()  # (r, in * taps)
            out_dim, in_dim = weight.shape[:2]
            w = weight.reshape(out_dim, -1)
            s = self.scale
            if self.dora_on_output:
                cross = (up * (w @ down.T.to(w.dtype)).float()).sum(1)
                delta_sq = ((up @ (down @ down.T)) * up).sum(1)
                base_sq = self._base_sq_norm(w, dim=1)
            else:
                taps = w.shape[1] // in_dim
                wt = (up.T.to(w.dtype) @ w).float().view(-1, in_dim, taps)  # (r, in, taps)
                d3 = down.view(-1, in_dim, taps)
                cross = (wt * d3).sum((0, 2))
                delta_sq = torch.einsum("rit,rs,sit->i", d3, up.T @ up, d3)
                base_sq = self._base_sq_norm(w.view(out_dim, in_dim, taps), dim=(0, 2))
            norm = (base_sq + 2 * s * cross + s * s * delta_sq).clamp_min(0).sqrt()
            return norm.reshape(self.dora_scale.shape)

    def _base_sq_norm(self, w: torch.Tensor, dim) -> torch.Tensor:
        """||W||^2 per channel, cached: the base weight is frozen (the cache
        follows the tensor's version, so an in-place change refreshes it). A
        compiled graph cannot compare data pointers: it recomputes it, one
        reduction over W, small beside the layer's own matmul."""
        if torch.compiler.is_compiling():
            return w.float().pow(2).sum(dim)
        key = (w.data_ptr(), self.base.weight._version, self.dora_on_output)
        if getattr(self, "_base_sq_key", None) != key:
            self._base_sq = w.float().pow(2).sum(dim)
            self._base_sq_key = key
        return self._base_sq

    # --- file format ----------------------------------------------------
    @classmethod
    def check_file_tensors(cls, t: dict[str, torch.Tensor]) -> tuple[int, str | None]:
        """The module's rank and, when its tensors do not fit together, why."""
        down, up, mid = t["lora_down.weight"], t["lora_up.weight"], t.get("lora_mid.weight")
        down_s, up_s = shape_text(down), shape_text(up)
        if down.dim() not in (2, 4) or up.dim() != down.dim():
            return first_dim(down), (f"lora_down {down_s} and lora_up {up_s} are not "
                                     "both 2-D (linear) or both 4-D (conv)")
        rank = down.shape[0]
        if mid is None:
            if up.shape[1] != rank:
                return rank, (f"lora_down has rank {rank} ({down_s}) but lora_up has rank "
                              f"{up.shape[1]} ({up_s})")
        elif (down.dim() != 4 or tuple(down.shape[2:]) != (1, 1) or mid.dim() != 4
              or mid.shape[1] != rank or up.shape[1] != mid.shape[0]):
            return rank, (f"Tucker lora_down {down_s}, lora_mid {shape_text(mid)} and lora_up "
                          f"{up_s} do not chain (rank x in x 1 x 1, rank x rank x k x k, "
                          "out x rank x 1 x 1)")
        if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
            return rank, f"lora_up {up_s} is not a 1x1 convolution"
        return rank, None

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
