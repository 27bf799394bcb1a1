"""The training route of LoKr: kron(w1, w2) applied to x without building it.

With x reshaped to X (c, d) row-major, the output reshaped to (a, b) is
w1 X w2^T (column-major: (w1 (x) w2) vec(X) = vec(w2 X w1^T)). For a conv the
same holds with "X w2^T" a convolution of the c channel groups of x with w2.
`KronApply` keeps only x and the two small factors for backward and recomputes
the grouped step there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _group(x: torch.Tensor, groups: int, conv: tuple | None) -> torch.Tensor:
    """x's input channels (c * d) as c groups of d, the groups moved to the batch."""
    if conv is None:
        return x.reshape(-1, x.shape[-1] // groups)
    return x.reshape(x.shape[0] * groups, -1, *x.shape[2:])


def _apply_w2(grouped: torch.Tensor, w2: torch.Tensor, conv: tuple | None) -> torch.Tensor:
    return F.linear(grouped, w2) if conv is None else F.conv2d(grouped, w2, None, *conv)


def _apply_w2_backward(
    grouped: torch.Tensor, w2: torch.Tensor, grad: torch.Tensor, conv: tuple | None, needs
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of `_apply_w2` for its input and for w2 (None when not needed)."""
    if conv is None:
        grad_in = grad @ w2 if needs[0] else None
        grad_w2 = grad.T @ grouped if needs[1] else None
        return grad_in, grad_w2
    stride, padding, dilation = conv
    grad_in, grad_w2, _ = torch.ops.aten.convolution_backward(
        grad, grouped, w2, None, stride, padding, dilation, False, [0, 0], 1,
        (needs[0], needs[1], False),
    )  # fmt: skip
    return grad_in, grad_w2


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """What the layer's matmuls would run in: the autocast dtype if it is on."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


class KronApply(torch.autograd.Function):
    """y = kron(w1, w2) applied to x (a Linear's or a conv's input), the
    product never built. Backward recomputes the grouped w2 step instead of
    keeping it: it is as large as the layer's output.

    `conv` is None for a Linear, else (stride, padding, dilation).
    """

    @staticmethod
    def forward(ctx, x, w1, w2, conv):
        # Backward runs outside autocast: fix the dtype here and use it there.
        dtype = _compute_dtype(x)
        x, w1, w2 = x.to(dtype), w1.to(dtype), w2.to(dtype)
        ctx.conv, ctx.dtype = conv, dtype
        ctx.save_for_backward(x, w1, w2)
        with torch.autocast(x.device.type, enabled=False):
            hidden = _apply_w2(_group(x, w1.shape[1], conv), w2, conv)
            out = w1 @ hidden.reshape(-1, w1.shape[1], hidden[0].numel())
        if conv is None:
            return out.reshape(*x.shape[:-1], -1)
        return out.reshape(x.shape[0], -1, *hidden.shape[2:])

    @staticmethod
    def backward(ctx, grad):
        x, w1, w2 = ctx.saved_tensors
        need_x, need_w1, need_w2 = ctx.needs_input_grad[:3]
        a, c = w1.shape
        grouped = _group(x, c, ctx.conv)
        hidden = _apply_w2(grouped, w2, ctx.conv)
        grad = grad.to(ctx.dtype).reshape(-1, a, hidden[0].numel())
        grad_w1 = None
        if need_w1:
            grad_w1 = torch.einsum(
                "n a m, n c m -> a c", grad, hidden.reshape(-1, c, grad.shape[2])
            )
        grad_hidden = (w1.T @ grad).reshape(hidden.shape)
        del hidden
        grad_grouped, grad_w2 = _apply_w2_backward(
            grouped, w2, grad_hidden, ctx.conv, (need_x, need_w2)
        )
        grad_x = grad_grouped.reshape(x.shape) if need_x else None
        return grad_x, grad_w1, grad_w2, None


def _conv_args(base: nn.Module) -> tuple | None:
    if isinstance(base, nn.Linear):
        return None
    return tuple(base.stride), tuple(base.padding), tuple(base.dilation)


def kron_apply(base: nn.Module, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor):
    """kron(w1, w2) applied to x with `base`'s stride/padding/dilation."""
    return KronApply.apply(x, w1, w2, _conv_args(base))


# --- the module -------------------------------------------------------------------
