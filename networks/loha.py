"""LoHa: delta W = (w1_a @ w1_b) * (w2_a @ w2_b), a Hadamard product of two
low-rank matrices (FedPara, Hyeon-Woo et al. 2022, arXiv:2108.06098; LyCORIS).

The two full-size products exist only transiently: `HadamardDelta` saves the
small factors and recomputes the products in backward, as LyCORIS does.
Init follows FORMATS.md section 3: w2_a = 0, w1_a ~ N(0, 0.1), w1_b, w2_b ~ N(0, 1),
so the delta starts at exactly 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterModule, Dropout, apply_weight


class HadamardDelta(torch.autograd.Function):
    """(w1_a @ w1_b) * (w2_a @ w2_b) without keeping the products for backward."""

    @staticmethod
    def forward(ctx, w1_a, w1_b, w2_a, w2_b):
        ctx.save_for_backward(w1_a, w1_b, w2_a, w2_b)
        return (w1_a @ w1_b) * (w2_a @ w2_b)

    @staticmethod
    def backward(ctx, grad):
        w1_a, w1_b, w2_a, w2_b = ctx.saved_tensors
        grad_1 = grad * (w2_a @ w2_b)
        grad_w1_a, grad_w1_b = grad_1 @ w1_b.T, w1_a.T @ grad_1
        del grad_1
        grad_2 = grad * (w1_a @ w1_b)
        return grad_w1_a, grad_w1_b, grad_2 @ w2_b.T, w2_a.T @ grad_2


def rebuild_tucker(t: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor) -> torch.Tensor:
    """LyCORIS Tucker rebuild: t (r, r, k, k), w_a (r, out), w_b (r, in) -> (out, in, k, k)."""
    return torch.einsum("i j h w, i o, j n -> o n h w", t, w_a, w_b)


def loha_delta_weight(tensors: dict[str, torch.Tensor], out_shape: torch.Size) -> torch.Tensor:
    """Unscaled delta W from file-layout tensors (FORMATS.md section 3)."""
    if "hada_t1" in tensors:
        return rebuild_tucker(tensors["hada_t1"], tensors["hada_w1_a"], tensors["hada_w1_b"]) * (
            rebuild_tucker(tensors["hada_t2"], tensors["hada_w2_a"], tensors["hada_w2_b"])
        )
    names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    return HadamardDelta.apply(*(tensors[n] for n in names)).reshape(out_shape)


class LoHaModule(AdapterModule):
    algorithm = "loha"

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
        out_dim, in_dim, *kernel = base.weight.shape
        if tucker and kernel and kernel != [1, 1]:
            for i in (1, 2):
                self.register_parameter(f"hada_w{i}_a", nn.Parameter(torch.empty(rank, out_dim)))
                self.register_parameter(f"hada_w{i}_b", nn.Parameter(torch.empty(rank, in_dim)))
                self.register_parameter(
                    f"hada_t{i}", nn.Parameter(torch.empty(rank, rank, *kernel))
                )
        else:
            flat_in = base.weight[0].numel()
            for i in (1, 2):
                self.register_parameter(f"hada_w{i}_a", nn.Parameter(torch.empty(out_dim, rank)))
                self.register_parameter(f"hada_w{i}_b", nn.Parameter(torch.empty(rank, flat_in)))
        self.reset_parameters()

    @property
    def tucker(self) -> bool:
        return hasattr(self, "hada_t1")

    def reset_parameters(self) -> None:
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w1_b, std=1.0)
        nn.init.zeros_(self.hada_w2_a)
        nn.init.normal_(self.hada_w2_b, std=1.0)
        if self.tucker:
            nn.init.normal_(self.hada_t1, std=0.1)
            nn.init.normal_(self.hada_t2, std=0.1)

    def delta_weight(self) -> torch.Tensor:
        return loha_delta_weight(dict(self.named_parameters()), self.base.weight.shape)

    def delta_forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        delta = self.delta_weight() * scale
        if self.training and self.dropout.rank:
            # LoHa has no rank-wide hidden activation; like LyCORIS, drop output rows.
            keep = torch.rand(delta.shape[0], device=delta.device) > self.dropout.rank
            delta = delta * (keep.to(delta.dtype) / (1 - self.dropout.rank)).view(
                -1, *[1] * (delta.dim() - 1)
            )
        out = apply_weight(self.base, x, delta)
        if self.training and self.dropout.neuron:
            out = F.dropout(out, self.dropout.neuron)
        return out

    # --- file format ----------------------------------------------------
    @staticmethod
    def recognises(suffixes: set[str]) -> bool:
        return {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= suffixes

    @classmethod
    def from_tensors(
        cls, lora_name: str, base: nn.Module, tensors: dict[str, torch.Tensor], dropout: Dropout
    ) -> LoHaModule:
        tucker = "hada_t1" in tensors
        rank = tensors["hada_w1_b"].shape[0]
        alpha = float(tensors["alpha"]) if "alpha" in tensors else rank
        module = cls(lora_name, base, rank, alpha, dropout, tucker=tucker)
        module.load_file_tensors(tensors)
        return module
