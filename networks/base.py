"""What every adapter algorithm shares: attaching to a frozen layer, the
multiplier, enable/disable, dropout, and merge/unmerge.

An algorithm subclass only says how to build its parameters, how to compute
its (unscaled) delta weight, and how to apply itself to an input. Everything
else is written once here, in the manner of PEFT's `lycoris_utils` base layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Dropout:
    """Training-time regularisation, all off by default.

    neuron: dropout on the adapter's hidden activations (kohya `network_dropout`).
    rank: drops whole rank channels per sample (kohya `rank_dropout`).
    module: skips the whole adapter for a step (kohya `module_dropout`).
    """

    neuron: float = 0.0
    rank: float = 0.0
    module: float = 0.0


def apply_weight(base: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Run `base`'s own operation (stride, padding...) with another weight."""
    return _LAYER_OPS[type(base)](base, x, weight)


def _linear(base: nn.Linear, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight)


def _conv2d(base: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, weight, None, base.stride, base.padding, base.dilation, base.groups)


_LAYER_OPS = {nn.Linear: _linear, nn.Conv2d: _conv2d}
SUPPORTED_LAYERS = tuple(_LAYER_OPS)


class AdapterModule(nn.Module):
    """Adds `multiplier * alpha/rank * delta(x)` to a frozen layer's output.

    The base layer is not re-parented (its state-dict names stay as they were,
    so diffusers and transformers still load into it); the adapter attaches
    through a forward hook that `detach()` removes again.
    """

    def __init__(self, lora_name: str, base: nn.Module, rank: int, alpha: float, dropout: Dropout):
        super().__init__()
        if type(base) not in _LAYER_OPS:
            raise TypeError(f"{lora_name}: cannot adapt a {type(base).__name__}")
        self.lora_name = lora_name
        self.rank = rank
        self.dropout = dropout
        self.multiplier = 1.0
        self.enabled = True
        self.merged = False
        # A list keeps the base layer out of this module's children and state dict.
        self._base = [base]
        self._hook: torch.utils.hooks.RemovableHandle | None = None
        self.register_buffer("alpha", torch.tensor(float(alpha)))

    # --- per-algorithm --------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """The unscaled delta W, shaped like the base weight."""
        raise NotImplementedError

    def delta_forward(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        """scale * delta y for input x (training dropout included); each algorithm
        applies `scale` where it is cheapest (a rank-sized tensor, not the output)."""
        raise NotImplementedError

    # --- shared ---------------------------------------------------------
    @property
    def base(self) -> nn.Module:
        return self._base[0]

    @property
    def scale(self) -> float:
        # Cached per version of the alpha buffer: float() of a GPU tensor would
        # synchronise the device on every forward.
        version = self.alpha._version
        if getattr(self, "_scale_version", None) != (version, self.alpha.data_ptr()):
            self._scale = float(self.alpha) / self.rank
            self._scale_version = (version, self.alpha.data_ptr())
        return self._scale

    def attach(self) -> None:
        if self._hook is None:
            self._hook = self.base.register_forward_hook(self._add_delta)

    def detach(self) -> None:
        if self.merged:
            self.unmerge()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _add_delta(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.merged or self.multiplier == 0:
            return output
        if self.training and self.dropout.module and torch.rand(()) < self.dropout.module:
            return output
        x = args[0]
        # Adapter weights stay fp32 under mixed precision. Under autocast the
        # adapter's matmuls run in the autocast dtype whatever x is, so an fp32
        # copy of x would be cast straight back: on an H100 those casts were a
        # quarter of a bf16 SD1.5 step's GPU time. Without autocast (a bf16
        # model sampled as it is), x must match the adapter's dtype.
        if x.dtype != self.alpha.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.alpha.dtype)
        delta = self.delta_forward(x, self.multiplier * self.scale)
        return output + (delta if delta.dtype == output.dtype else delta.to(output.dtype))

    def _drop_ranks(self, hidden: torch.Tensor, channel_dim: int) -> torch.Tensor:
        """Zero whole rank channels per sample, rescaled to keep the expectation."""
        p = self.dropout.rank
        if not (self.training and p):
            return hidden
        shape = [1] * hidden.dim()
        shape[0], shape[channel_dim] = hidden.shape[0], hidden.shape[channel_dim]
        keep = (torch.rand(shape, device=hidden.device) > p).to(hidden.dtype) / (1 - p)
        return hidden * keep

    @torch.no_grad()
    def scaled_delta(self) -> torch.Tensor:
        delta = self.delta_weight().reshape(self.base.weight.shape)
        return delta * (self.multiplier * self.scale)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the delta into the base weight; the hook then adds nothing.

        The original weight is kept so that `unmerge` restores it bit for bit
        (subtracting the delta again would leave rounding error, large in fp16).
        """
        if self.merged:
            return
        delta = self.scaled_delta()
        if not torch.isfinite(delta).all():
            raise ValueError(f"{self.lora_name}: refusing to merge a delta with NaN/Inf values")
        self._weight_before_merge = self.base.weight.detach().clone()
        self.base.weight.add_(delta.to(self.base.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.base.weight.copy_(self._weight_before_merge)
        del self._weight_before_merge
        self.merged = False

    @torch.no_grad()
    def load_file_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy this module's tensors from a kohya file (names are file suffixes)."""
        for name, param in self.named_parameters():
            if name not in tensors:
                raise KeyError(f"{self.lora_name}: the file has no {name}")
            param.copy_(tensors[name].reshape(param.shape))
        if "alpha" in tensors:
            self.alpha.copy_(tensors["alpha"])
