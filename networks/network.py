"""A set of adapter modules over a U-Net and a text encoder."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from . import dora as dora_math
from .algorithms import ALGORITHMS
from .base import AdapterModule, Dropout
from .registry import module_class, module_class_for_keys
from .targets import (
    TEXT_ENCODER_PREFIX,
    UNET_PREFIX,
    all_layers_by_name,
    text_encoder_targets,
    unet_targets,
)


@dataclass(frozen=True)
class NetworkSpec:
    """What to build. rank/alpha for Linear and 1x1 layers, conv_rank/conv_alpha
    for k x k convs (kohya's convention); conv layers only for the algorithms
    that target them. tucker/dora/dora_on_output are the options several
    algorithms share; `options` holds an algorithm's own ones (networks.algorithms)."""

    algorithm: str = "lora"
    rank: int = 16
    alpha: float = 8.0
    conv_rank: int = 8
    conv_alpha: float = 4.0
    tucker: bool = False
    dropout: Dropout = field(default_factory=Dropout)
    train_unet: bool = True
    train_text_encoder: bool = True
    dora: bool = False
    dora_on_output: bool = False
    options: dict[str, object] = field(default_factory=dict)

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(
                f"unknown algorithm {self.algorithm!r}; choose from {sorted(ALGORITHMS)}"
            )
        if self.rank < 1 or (self.targets_conv and self.conv_rank < 1):
            raise ValueError("rank and conv_rank must be at least 1")
        allowed = set(ALGORITHMS[self.algorithm].option_names)
        unknown = set(self.options) - allowed
        if unknown:
            raise ValueError(f"{self.algorithm} has no option {sorted(unknown)[0]!r}")

    @property
    def targets_conv(self) -> bool:
        return ALGORITHMS[self.algorithm].targets_conv

    def option_values(self) -> dict[str, object]:
        """Every option of the algorithm with its value here (defaults filled in)."""
        shared = {"tucker": self.tucker, "dora": self.dora, "dora_on_output": self.dora_on_output}
        return {
            option.name: self.options.get(option.name, shared.get(option.name, option.default))
            for option in ALGORITHMS[self.algorithm].options
        }

    def module_kwargs(self) -> dict[str, object]:
        """The options the module constructor takes (DoRA is added on top by the base)."""
        return {k: v for k, v in self.option_values().items() if k not in DORA_OPTIONS}


DORA_OPTIONS = ("dora", "dora_on_output")


class AdapterNetwork(nn.Module):
    """Adapters registered under their kohya names, so `state_dict()` keys are
    exactly the file's keys (`lora_unet_..._to_q.lora_down.weight`)."""

    def __init__(self, adapters: Iterable[AdapterModule], spec: NetworkSpec | None = None):
        super().__init__()
        self.spec = spec
        for adapter in adapters:
            self.add_module(adapter.lora_name, adapter)

    @classmethod
    def create(
        cls, spec: NetworkSpec, unet: nn.Module | None = None, text_encoder: nn.Module | None = None
    ) -> AdapterNetwork:
        module_cls, kwargs = module_class(spec.algorithm), spec.module_kwargs()
        layers = []
        if unet is not None and spec.train_unet:
            for target in unet_targets(unet, conv=spec.targets_conv):
                kxk = target.is_conv_kxk
                layers.append((target, spec.conv_rank if kxk else spec.rank,
                               spec.conv_alpha if kxk else spec.alpha))
        if text_encoder is not None and spec.train_text_encoder:
            layers += [(t, spec.rank, spec.alpha) for t in text_encoder_targets(text_encoder)]
        adapters = []
        for target, rank, alpha in layers:
            adapter = module_cls(
                target.lora_name, target.layer, rank, alpha, spec.dropout, **kwargs
            )
            if spec.dora:
                adapter.enable_dora(on_output=spec.dora_on_output)
            adapters.append(adapter)
        network = cls(adapters, spec)
        network.to(device=_device_of(unet, text_encoder))
        return network

    @classmethod
    def from_state_dict(
        cls,
        tensors: dict[str, torch.Tensor],
        unet: nn.Module | None,
        text_encoder: nn.Module | None,
        dropout: Dropout = Dropout(),
    ) -> AdapterNetwork:
        """Rebuild the modules a kohya file describes (to continue training or
        to apply it). Raises KeyError naming keys that match no layer."""
        layers = all_layers_by_name(unet, text_encoder)
        adapters, unmatched = [], []
        for lora_name, module_tensors in group_by_module(tensors).items():
            layer = layers.get(lora_name)
            module_cls = module_class_for_keys(set(module_tensors))
            if layer is None or module_cls is None:
                unmatched.append(lora_name)
                continue
            adapter = module_cls.from_tensors(lora_name, layer, module_tensors, dropout)
            if "dora_scale" in module_tensors:
                load_dora_scale(adapter, module_tensors["dora_scale"])
            adapters.append(adapter)
        if unmatched:
            raise KeyError(
                f"{len(unmatched)} modules in the file match no layer of this model, "
                f"e.g. {unmatched[0]}"
            )
        network = cls(adapters)
        network.to(device=_device_of(unet, text_encoder))
        return network

    # --- the adapters -----------------------------------------------------
    @property
    def adapters(self) -> list[AdapterModule]:
        return [m for m in self.children() if isinstance(m, AdapterModule)]

    @property
    def unet_adapters(self) -> list[AdapterModule]:
        return [m for m in self.adapters if m.lora_name.startswith(UNET_PREFIX + "_")]

    @property
    def text_encoder_adapters(self) -> list[AdapterModule]:
        return [m for m in self.adapters if m.lora_name.startswith(TEXT_ENCODER_PREFIX + "_")]

    def attach(self) -> AdapterNetwork:
        for adapter in self.adapters:
            adapter.attach()
        return self

    def detach(self) -> None:
        """Remove every hook (unmerging first): the base model is as it was."""
        for adapter in self.adapters:
            adapter.detach()

    def set_multiplier(self, multiplier: float) -> None:
        for adapter in self.adapters:
            if adapter.merged:
                raise RuntimeError("unmerge before changing the multiplier")
            adapter.multiplier = multiplier

    def set_enabled(self, enabled: bool) -> None:
        for adapter in self.adapters:
            adapter.enabled = enabled

    def merge(self) -> None:
        for adapter in self.adapters:
            adapter.merge()

    def unmerge(self) -> None:
        for adapter in self.adapters:
            adapter.unmerge()

    def parameter_groups(self, unet_lr: float, text_encoder_lr: float) -> list[dict]:
        """Optimizer groups with separate U-Net and text-encoder learning rates."""
        groups = []
        for adapters, lr in (
            (self.unet_adapters, unet_lr),
            (self.text_encoder_adapters, text_encoder_lr),
        ):
            params = [p for a in adapters for p in a.parameters()]
            if params:
                groups.append({"params": params, "lr": lr})
        return groups


@torch.no_grad()
def load_dora_scale(adapter: AdapterModule, magnitude: torch.Tensor) -> None:
    """DoRA on a module read from a file, on the axis its `dora_scale` shape
    shows. Raises KeyError naming the module when the shape fits no axis."""
    try:
        on_output = dora_math.axis_of(magnitude, adapter.base.weight.shape)
    except ValueError as exc:
        raise KeyError(f"{adapter.lora_name}: {exc}") from None
    adapter.enable_dora(on_output)
    adapter.dora_scale.copy_(magnitude)


def group_by_module(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """`name.suffix` keys -> {name: {suffix: tensor}}; the suffix may contain dots."""
    grouped: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in tensors.items():
        lora_name, _, suffix = key.partition(".")
        grouped[lora_name][suffix] = tensor
    return dict(grouped)


def _device_of(*models: nn.Module | None) -> torch.device:
    for model in models:
        if model is not None:
            return next(model.parameters()).device
    return torch.device("cpu")
