"""What every adapter algorithm shares: attaching to a frozen layer, the
multiplier, enable/disable, dropout, DoRA, and the merged weight.

An algorithm subclass only says how to build its parameters (its constructor
takes its `networks.algorithms` options as keyword arguments), how to compute
its (unscaled) delta weight, how to apply itself to an input, and how to
rebuild itself from a file's tensors (`from_tensors`). Everything else is
written once here, in the manner of PEFT's `lycoris_utils` base layer and
ComfyUI's `weight_adapter` base: `merged_weight(W)` is the one rule for what an
adapter makes of a base weight, and merging, previews and `python -m trainer
sample` all go through it (`networks.merge`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import dora as dora_math
from .algorithms import ALGORITHMS


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


def shape_text(x: torch.Tensor) -> str:
    return str(tuple(x.shape))


def first_dim(x: torch.Tensor) -> int:
    return x.shape[0] if x.dim() else 1


class AdapterModule(nn.Module):
    """Adds `multiplier * alpha/rank * delta(x)` to a frozen layer's output
    (with DoRA, turns the layer into its weight-decomposed version instead).

    The base layer is not re-parented (its state-dict names stay as they were,
    so diffusers and transformers still load into it); the adapter attaches
    through forward hooks that `detach()` removes again.
    """

    algorithm = ""  # its name in networks.algorithms.ALGORITHMS

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
        self.dora_on_output = False
        # Set by the input-axis DoRA pre-hook for the forward hook that follows it.
        self._dora_scaled, self._dora_keep = False, True
        # A list keeps the base layer out of this module's children and state dict.
        self._base = [base]
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.refresh_scale()

    # --- per-algorithm --------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """The unscaled delta W, shaped like the base weight."""
        raise NotImplementedError

    def delta_forward(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        """scale * delta y for input x (training dropout included); each algorithm
        applies `scale` where it is cheapest (a rank-sized tensor, not the output)."""
        raise NotImplementedError

    @classmethod
    def recognises(cls, suffixes: set[str]) -> bool:
        """Whether a file module with these tensor suffixes is this algorithm's."""
        return ALGORITHMS[cls.algorithm].recognises(suffixes)

    @classmethod
    def check_file_tensors(cls, tensors: dict[str, torch.Tensor]) -> tuple[int, str | None]:
        """A file module's rank and, when its tensors do not fit together, why
        (for `inspect`, before any layer is built). This default only reads the
        rank as the smallest first dimension among the factors."""
        factors = [t for name, t in tensors.items() if name not in ("alpha", "dora_scale")]
        return min((first_dim(t) for t in factors), default=0), None

    def file_options(self) -> dict[str, object]:
        """The options this module's tensors show (read back into the spec)."""
        options: dict[str, object] = {"dora": self.dora, "dora_on_output": self.dora_on_output}
        if hasattr(type(self), "tucker"):
            options["tucker"] = self.tucker
        return options

    @classmethod
    def network_options(
        cls, adapters: list[AdapterModule], args: dict | None = None
    ) -> dict[str, object]:
        """The options a file's modules of this class show together: a boolean
        holds if any module shows it (Tucker exists only on k x k convs).
        Algorithms whose options only the whole set reveals override this;
        `args` is the file's `ss_network_args`, for an option the tensors only
        narrow down (LoKr's factor)."""
        options: dict[str, object] = {}
        for adapter in adapters:
            for name, value in adapter.file_options().items():
                options[name] = (options.get(name, False) or value) if isinstance(
                    value, bool) else value
        return options

    # --- shared ---------------------------------------------------------
    @property
    def base(self) -> nn.Module:
        return self._base[0]

    def refresh_scale(self) -> None:
        """Fill the scale's cache eagerly (a compiled graph only reads it).
        The base class's rule: a subclass's `scale` may need fields that its
        own __init__ sets after this one."""
        AdapterModule.scale.fget(self)

    @property
    def scale(self) -> float:
        # Cached per version of the alpha buffer: float() of a GPU tensor would
        # synchronise the device on every forward. A compiled graph reads the
        # cached value (refresh_scale, called before compiling: trainer/compile.py):
        # it cannot trace a read-back, and alpha is never trained.
        if torch.compiler.is_compiling():
            return self._scale
        version = self.alpha._version
        if getattr(self, "_scale_version", None) != (version, self.alpha.data_ptr()):
            self._scale = float(self.alpha) / self.rank
            self._scale_version = (version, self.alpha.data_ptr())
        return self._scale

    @property
    def dora(self) -> bool:
        return "dora_scale" in self._parameters

    def attach(self) -> None:
        if self._hooks:
            return
        if self.dora and not self.dora_on_output:
            self._hooks.append(self.base.register_forward_pre_hook(self._dora_scale_input))
        add = self._add_dora if self.dora else self._add_delta
        self._hooks.append(self.base.register_forward_hook(add))

    def detach(self) -> None:
        if self.merged:
            self.unmerge()
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _add_delta(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.merged or self.multiplier == 0:
            return output
        keep = self._module_kept()
        if keep is False:
            return output
        x = self._adapter_input(args[0])
        delta = self._masked(self.delta_forward(x, self.multiplier * self.scale), keep)
        return output + (delta if delta.dtype == output.dtype else delta.to(output.dtype))

    def _module_kept(self) -> bool | torch.Tensor:
        """Module dropout's draw for this forward: True/False in eager mode (a
        dropped module costs nothing), a 0/1 tensor under torch.compile, where a
        branch on a random draw would split the U-Net graph at every adapter."""
        p = self.dropout.module
        if not (self.training and p):
            return True
        if torch.compiler.is_compiling():
            return (torch.rand(()) >= p).float()
        return bool(torch.rand(()) >= p)

    @staticmethod
    def _masked(delta: torch.Tensor, keep: bool | torch.Tensor) -> torch.Tensor:
        return delta if keep is True else delta * keep.to(delta.device, delta.dtype)

    def _adapter_input(self, x: torch.Tensor) -> torch.Tensor:
        # Adapter weights stay fp32 under mixed precision. Under autocast the
        # adapter's matmuls run in the autocast dtype whatever x is, so an fp32
        # copy of x would be cast straight back: on an H100 those casts were a
        # quarter of a bf16 SD1.5 step's GPU time. Without autocast (a bf16
        # model sampled as it is), x must match the adapter's dtype.
        if x.dtype != self.alpha.dtype and not torch.is_autocast_enabled(x.device.type):
            return x.to(self.alpha.dtype)
        return x

    def _drop_ranks(self, hidden: torch.Tensor, channel_dim: int) -> torch.Tensor:
        """Zero whole rank channels per sample, rescaled to keep the expectation."""
        p = self.dropout.rank
        if not (self.training and p):
            return hidden
        shape = [1] * hidden.dim()
        shape[0], shape[channel_dim] = hidden.shape[0], hidden.shape[channel_dim]
        keep = (torch.rand(shape, device=hidden.device) > p).to(hidden.dtype) / (1 - p)
        return hidden * keep

    # --- DoRA -----------------------------------------------------------
    @torch.no_grad()
    def enable_dora(self, on_output: bool = False) -> None:
        """Learn a magnitude, initialised to the base weight's norm (so a fresh
        module still changes nothing), saved as `dora_scale`."""
        if self._hooks:
            raise RuntimeError(f"{self.lora_name}: enable DoRA before attaching")
        self.dora_on_output = on_output
        norm = dora_math.weight_norm(self.base.weight.float(), on_output)
        self.dora_scale = nn.Parameter(norm.to(self.alpha.device))

    def dora_norm(self) -> torch.Tensor:
        """||W + scale * delta W|| along the DoRA axis, detached from the graph as
        in the DoRA paper (section 4.3) and PEFT: the magnitude, not the norm,
        carries the gradient. Algorithms may compute it without the full delta."""
        with torch.no_grad():
            merged = self.base.weight.float() + self.scale * self.delta_weight().reshape(
                self.base.weight.shape
            ).float()
            return dora_math.weight_norm(merged, self.dora_on_output)

    def _dora_ratio(self) -> torch.Tensor:
        """m / ||W'||, shaped like the magnitude."""
        return self.dora_scale / (self.dora_norm() + dora_math.EPS)

    def _dora_active(self) -> bool:
        return self.enabled and not self.merged and self.multiplier != 0

    def _dora_scale_input(self, module: nn.Module, args: tuple):
        """Input-axis DoRA at multiplier 1: W' diag(m/||W'||) x is the plain layer
        (base + delta) applied to x scaled per input channel, so the hook scales
        x and no full-size weight is built. Module dropout is drawn here, where
        the base layer's input can still be left alone."""
        self._dora_scaled, self._dora_keep = False, True
        if not self._dora_active() or self.multiplier != 1:
            return None
        keep = self._module_kept()
        self._dora_keep = keep
        if keep is False:
            return None
        self._dora_scaled = True
        ratio = self._channel_view(self._dora_ratio(), args[0])
        if keep is not True:  # compiled: a dropped module leaves x as it is
            ratio = 1 + keep.to(ratio.device, ratio.dtype) * (ratio - 1)
        return (args[0] * ratio.to(args[0].dtype), *args[1:])

    def _add_dora(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if not self._dora_active():
            return output
        x = args[0]
        if self._dora_scaled:  # x is already scaled and output = W0 x' + b
            self._dora_scaled = False
            delta = self.delta_forward(self._adapter_input(x), self.scale)
            return output + self._masked(delta, self._dora_keep).to(output.dtype)
        if self._dora_keep is False:  # dropped in the pre-hook
            return output
        keep = self._module_kept()
        if keep is False:
            return output
        return output + self._masked(self._blended_dora(x, output), keep).to(output.dtype)

    def _blended_dora(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """multiplier * (y_dora - y) for a multiplier other than 1 or the output axis."""
        k, ratio = self.multiplier, self._dora_ratio()
        if self.dora_on_output:
            # W_dora x = r * (W0 x + scale * delta x): bias excluded from the rescale.
            r = self._channel_view(ratio, output)
            bias = self.base.bias
            plain = output if bias is None else output - self._channel_view(bias, output)
            delta = self.delta_forward(self._adapter_input(x), self.scale)
            return k * ((r - 1) * plain + r * delta)
        c = self._channel_view(ratio, x)
        base_part = apply_weight(self.base, x * (c - 1).to(x.dtype), self.base.weight)
        delta = self.delta_forward(self._adapter_input(x * c.to(x.dtype)), self.scale)
        return k * (base_part + delta)

    def _channel_view(self, values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Per-channel `values` (a magnitude-shaped tensor, or a bias) broadcast
        along the channel axis of `like`: last for a Linear, 1 for a conv."""
        flat = values.reshape(-1)
        if isinstance(self.base, nn.Linear):
            return flat
        return flat.view(1, -1, *[1] * (like.dim() - 2))

    # --- the merged weight ----------------------------------------------
    @torch.no_grad()
    def scaled_delta(self) -> torch.Tensor:
        delta = self.delta_weight().reshape(self.base.weight.shape)
        return delta * (self.multiplier * self.scale)

    @torch.no_grad()
    def weight_update(self, weight: torch.Tensor) -> torch.Tensor:
        """merged_weight(weight) - weight for an fp32 base weight: what merging
        this module adds. Without DoRA that is the scaled delta; with DoRA the
        multiplier k blends, W + k * (W_dora - W), as A1111 and ComfyUI do."""
        if not self.dora:
            return self.scaled_delta()
        delta = self.delta_weight().reshape(weight.shape).float() * self.scale
        decomposed = dora_math.decompose(weight + delta, self.dora_scale.float(),
                                         self.dora_on_output)
        return self.multiplier * (decomposed - weight)

    @torch.no_grad()
    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight this module makes of the base weight `weight` (fp32)."""
        return weight + self.weight_update(weight)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the module into the base weight; the hooks then add nothing.

        The original weight is kept so that `unmerge` restores it bit for bit
        (subtracting the delta again would leave rounding error, large in fp16).
        """
        from .merge import merge_into_layer

        if self.merged:
            return
        self._weight_before_merge = self.base.weight.detach().clone()
        try:
            merge_into_layer(self.base.weight, [self])
        except ValueError as exc:
            del self._weight_before_merge
            raise ValueError(f"{self.lora_name}: refusing to merge: {exc}") from None
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
