"""LoHa: delta W = (w1_a @ w1_b) * (w2_a @ w2_b), a Hadamard product of two
low-rank matrices (FedPara, Hyeon-Woo et al. 2022, arXiv:2108.06098; LyCORIS).

In training the full-size products are not built at all while that is cheaper:
a Hadamard product of two rank-r matrices is a rank-r^2 product of their
row-wise Kronecker ("face-splitting") factors,
    (A1 B1) * (A2 B2) = (A1 . A2) (B1 . B2),
so the delta path runs like a rank-r^2 LoRA. At high rank, where that path would
cost more than the layer itself, the delta weight is built instead; then
`HadamardDelta` saves only the small factors and recomputes the products in
backward, as LyCORIS does.
Init as LyCORIS: w2_a = 0, w1_a ~ N(0, 0.1), w1_b, w2_b ~ N(0, 1),
so the delta starts at exactly 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterModule, Dropout, apply_weight, first_dim, shape_text


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


def face_split(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Kronecker product: (n, r), (n, s) -> (n, r*s)."""
    return (a[:, :, None] * b[:, None, :]).flatten(1)


def rebuild_tucker(t: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor) -> torch.Tensor:
    """LyCORIS Tucker rebuild: t (r, r, k, k), w_a (r, out), w_b (r, in) -> (out, in, k, k)."""
    return torch.einsum("i j h w, i o, j n -> o n h w", t, w_a, w_b)


def loha_delta_weight(tensors: dict[str, torch.Tensor], out_shape: torch.Size) -> torch.Tensor:
    """Unscaled delta W from file-layout tensors (the LyCORIS layout)."""
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

    @property
    def factorised_path_is_cheaper(self) -> bool:
        """Per-token multiply-adds of the rank-r^2 path against one full-size op."""
        out_dim, in_dim, *kernel = self.base.weight.shape
        if getattr(self.base, "groups", 1) != 1:
            return False
        taps = kernel[0] * kernel[1] if kernel else 1
        r2 = self.rank**2
        if self.tucker:
            return r2 * (in_dim + out_dim) + r2 * r2 * taps <= in_dim * out_dim * taps
        return r2 * (in_dim * taps + out_dim) <= in_dim * taps * out_dim

    def _row_dropout_scale(self, rows: int, device: torch.device) -> torch.Tensor | None:
        """LoHa has no rank-wide hidden activation; like LyCORIS, drop output rows."""
        if not (self.training and self.dropout.rank):
            return None
        keep = torch.rand(rows, device=device) > self.dropout.rank
        return keep.to(self.hada_w1_a.dtype) / (1 - self.dropout.rank)

    def delta_forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        if self.factorised_path_is_cheaper:
            out = self._factorised_delta_forward(x, scale)
        else:
            delta = self.delta_weight() * scale
            rows = self._row_dropout_scale(delta.shape[0], delta.device)
            if rows is not None:
                delta = delta * rows.view(-1, *[1] * (delta.dim() - 1))
            out = apply_weight(self.base, x, delta)
        if self.training and self.dropout.neuron:
            out = F.dropout(out, self.dropout.neuron)
        return out

    def _factorised_delta_forward(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        base = self.base
        if self.tucker:
            # (r^2, out) and (r^2, in) Kronecker factors around an (r^2, r^2, k, k) core.
            up = face_split(self.hada_w1_a.T, self.hada_w2_a.T)
            down = face_split(self.hada_w1_b.T, self.hada_w2_b.T).T
            t1, t2 = self.hada_t1, self.hada_t2
            core = (t1[:, None, :, None] * t2[None, :, None, :]).flatten(0, 1).flatten(1, 2)
        else:
            up = face_split(self.hada_w1_a, self.hada_w2_a)
            down = face_split(self.hada_w1_b.T, self.hada_w2_b.T).T
            core = None
        rows = self._row_dropout_scale(up.shape[0], up.device)
        up = up * scale if rows is None else up * (rows * scale)[:, None]
        if isinstance(base, nn.Linear):
            return F.linear(F.linear(x, down), up)
        conv = dict(stride=base.stride, padding=base.padding, dilation=base.dilation)
        if core is None:
            hidden = F.conv2d(x, down.reshape(-1, *base.weight.shape[1:]), **conv)
        else:
            hidden = F.conv2d(F.conv2d(x, down[..., None, None]), core, **conv)
        return F.conv2d(hidden, up[..., None, None])

    # --- file format ----------------------------------------------------
    @classmethod
    def check_file_tensors(cls, t: dict[str, torch.Tensor]) -> tuple[int, str | None]:
        """The module's rank and, when its tensors do not fit together, why."""
        w1_a, w1_b, w2_a, w2_b = (t[f"hada_w{i}_{s}"] for i in (1, 2) for s in ("a", "b"))
        t1, t2 = t.get("hada_t1"), t.get("hada_t2")
        rank = first_dim(w1_b)
        shapes = ", ".join(f"hada_w{i}_{s} {shape_text(x)}" for (i, s), x in zip(
            ((1, "a"), (1, "b"), (2, "a"), (2, "b")), (w1_a, w1_b, w2_a, w2_b), strict=True))
        if any(x.dim() != 2 for x in (w1_a, w1_b, w2_a, w2_b)):
            return rank, f"the hada_w tensors are not all 2-D ({shapes})"
        if (t1 is None) != (t2 is None):
            return rank, "only one of hada_t1 and hada_t2 is present (Tucker needs both)"
        if t1 is None:  # (out, r) @ (r, in) for each factor
            fits = w1_a.shape[1] == w1_b.shape[0] and w2_a.shape[1] == w2_b.shape[0]
            same_size = w1_a.shape[0] == w2_a.shape[0] and w1_b.shape[1] == w2_b.shape[1]
        else:  # t (r, r, k, k) with w_a (r, out), w_b (r, in)
            fits = all(x.dim() == 4 and x.shape[0] == a.shape[0] and x.shape[1] == b.shape[0]
                       for x, a, b in ((t1, w1_a, w1_b), (t2, w2_a, w2_b)))
            same_size = (w1_a.shape[1] == w2_a.shape[1] and w1_b.shape[1] == w2_b.shape[1]
                         and t1.shape[2:] == t2.shape[2:])
            shapes += f", hada_t1 {shape_text(t1)}, hada_t2 {shape_text(t2)}"
        if not fits:
            return rank, f"the factors' ranks do not match ({shapes})"
        if w1_b.shape[0] != w2_b.shape[0]:
            return rank, f"hada_w1 has rank {w1_b.shape[0]} but hada_w2 rank {w2_b.shape[0]}"
        if not same_size:
            return rank, f"the two Hadamard factors are not the same size ({shapes})"
        return rank, None

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
