"""Low-rank math the adapter-file tools share (resize, merge, extract, merge-into).

- `module_delta`: the full scaled delta (alpha / rank applied) of one module
  as a file stores it, for every algorithm, computed by the algorithm's own
  class (`from_tensors` on a stand-in layer of the right shape, then
  `scaled_delta()`), so this module never repeats an algorithm's math.
- `low_rank`: the best rank-r approximation of a delta (Eckart-Young), in the
  kohya LoRA/LoCon layout, the singular values split evenly between up and
  down (sqrt(s) on each side keeps the two factors of similar size, which
  keeps fp16/bf16 files from losing precision on one side).
- `dynamic_rank`: kohya sd-scripts' `--dynamic_method` rules of
  networks/resize_lora.py (`sv_ratio`, `sv_cumulative`, `sv_fro`).

DoRA modules (a `dora_scale` tensor) are not an additive delta: the merged
weight depends on the base weight, so `module_delta` refuses them
(`NotAdditive`); merging them into a model is `AdapterModule.weight_update`'s job.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from .base import AdapterModule, Dropout
from .loha import face_split
from .registry import module_class_for_keys

DYNAMIC_METHODS = ("sv_ratio", "sv_cumulative", "sv_fro")
# kohya: a module whose largest singular value is at most this is a zero matrix.
MIN_SV = 1e-6


class NotAdditive(ValueError):
    """A module whose effect is not a delta added to the weight (DoRA)."""


@dataclass
class LowRank:
    """A delta's rank-`rank` approximation in kohya layout; `singular_values`
    holds all of the delta's singular values (descending), kept or not."""

    up: torch.Tensor
    down: torch.Tensor
    singular_values: torch.Tensor
    rank: int

    @property
    def kept_fraction(self) -> float:
        """Frobenius norm kept: sqrt(sum kept s^2 / sum all s^2); 1 for a zero delta."""
        squares = self.singular_values.double().pow(2)
        total = float(squares.sum())
        return 1.0 if total == 0 else math.sqrt(float(squares[: self.rank].sum()) / total)

    @property
    def error(self) -> float:
        """Frobenius norm of what is discarded: sqrt(sum of the discarded s^2),
        which is ||delta - up @ down||_F (Eckart-Young)."""
        return math.sqrt(float(self.singular_values[self.rank:].double().pow(2).sum()))

    def delta(self) -> torch.Tensor:
        """up @ down, shaped like the delta it approximates (a conv's kernel kept)."""
        return (self.up.flatten(1) @ self.down.flatten(1)).reshape(
            self.up.shape[0], *self.down.shape[1:])


def svd(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 reduced SVD of the 2-D view (out, in * kh * kw)."""
    return torch.linalg.svd(delta.detach().float().reshape(delta.shape[0], -1),
                            full_matrices=False)


def factored_svd(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                  torch.Tensor]:
    """The SVD of up @ down (up (out, r), down (r, n), any trailing 1x1 or
    kernel dimensions flattened) without building the product: with up = Qu Ru
    and down^T = Qd Rd, up @ down = Qu (Ru Rd^T) Qd^T, and the r x r core's SVD
    gives the product's. Cost O((out + n) r^2) instead of a full SVD's
    O(out n min(out, n)). The singular values are padded with zeros to
    min(out, n), all of them as `svd` gives; u and vh hold the first r."""
    up, down = up.detach().float().flatten(1), down.detach().float().flatten(1)
    qu, ru = torch.linalg.qr(up)
    qd, rd = torch.linalg.qr(down.T)
    uc, s, vhc = torch.linalg.svd(ru @ rd.T)
    full = min(up.shape[0], down.shape[1])
    s = torch.cat([s, s.new_zeros(max(0, full - s.numel()))])[:full]
    return (qu @ uc)[:, :full], s, (vhc @ qd.T)[:full]


def low_rank(delta: torch.Tensor, rank: int) -> LowRank:
    """The best rank-`rank` approximation of `delta` (out, in) or (out, in, kh, kw).

    Linear: up (out, r), down (r, in). Conv: down (r, in, kh, kw), up
    (out, r, 1, 1), the layout kohya LoCon files use. `rank` is capped at
    min(out, in * kh * kw) and is at least 1.
    """
    u, s, vh = svd(delta)
    return from_svd(u, s, vh, rank, delta.shape)


def from_svd(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int,
             shape: torch.Size | tuple[int, ...]) -> LowRank:
    """`low_rank` from an SVD already computed (to pick the rank from s first)."""
    rank = max(1, min(int(rank), s.numel(), u.shape[1]))
    root = s[:rank].sqrt()
    up = u[:, :rank] * root
    down = root[:, None] * vh[:rank]
    out_dim, *rest = shape
    if len(rest) == 3:  # conv: (in, kh, kw)
        down = down.reshape(rank, *rest)
        up = up.reshape(out_dim, rank, 1, 1)
    return LowRank(up.contiguous(), down.contiguous(), s, rank)


def dynamic_rank(singular_values: torch.Tensor, method: str, value: float, max_rank: int) -> int:
    """The rank kohya's resize_lora.py `--dynamic_method` keeps, capped by `max_rank`.

    With s the singular values (descending, n of them) and `rank_resize`'s
    "+ 1" after each `index_*` function (which clamp their index to
    [1, n - 1] first), kohya keeps:

    - `sv_ratio`: 1 + the number of s strictly greater than s[0] / value;
    - `sv_cumulative`: 1 + the smallest r with cumsum(s)[r-1] / sum(s) >= value;
    - `sv_fro`: 1 + the smallest r with cumsum(s^2)[r-1] / sum(s^2) >= value^2
      (a Frobenius fraction of `value`).

    So kohya keeps one singular value more than the bare rule; we do the same,
    so that a resize here picks the ranks kohya's picks. A zero matrix
    (s[0] <= 1e-6) gets rank 1, as in kohya. The result is in [1, max_rank].
    """
    s = singular_values.double()
    n = s.numel()
    if n == 0 or float(s[0]) <= MIN_SV:
        return 1
    if method == "sv_ratio":
        index = int((s > s[0] / value).sum())
    elif method == "sv_cumulative":
        index = int(torch.searchsorted(torch.cumsum(s, 0) / s.sum(), torch.tensor(
            float(value), dtype=s.dtype))) + 1
    elif method == "sv_fro":
        squares = s.pow(2)
        index = int(torch.searchsorted(torch.cumsum(squares, 0) / squares.sum(), torch.tensor(
            float(value) ** 2, dtype=s.dtype))) + 1
    else:
        raise ValueError(f"unknown dynamic method {method!r}; choose from {DYNAMIC_METHODS}")
    index = max(1, min(index, n - 1))
    return max(1, min(index + 1, int(max_rank)))


# --- one module of a file ------------------------------------------------

# SD U-Net layers that are 3x3 convolutions (kohya names); a LoHa or low-rank
# LoKr file stores their factors flattened, (r, in * 3 * 3), so only the name
# tells their kernel.
_KXK_NAME = re.compile(r"^lora_unet_.*(_resnets_\d+_conv[12]|_(down|up)samplers_0_conv)$")
# ... and the 1x1 convolutions (SD1.x proj_in/proj_out are 1x1 convs).
_CONV1X1_NAME = re.compile(r"^lora_unet_.*(_conv_shortcut|_proj_in|_proj_out)$")


def weight_shape_for(lora_name: str, t: dict[str, torch.Tensor]) -> tuple[int, ...]:
    """The base layer's weight shape a file module fits, from its tensors, and
    from its SD U-Net name where the tensors store a conv flattened."""
    if "lora_down.weight" in t:
        down, up = t["lora_down.weight"], t["lora_up.weight"]
        if "lora_mid.weight" in t:
            return (up.shape[0], down.shape[1], *t["lora_mid.weight"].shape[2:])
        return (up.shape[0], *down.shape[1:])
    if "hada_w1_a" in t:
        if "hada_t1" in t:
            return (t["hada_w1_a"].shape[1], t["hada_w1_b"].shape[1], *t["hada_t1"].shape[2:])
        return _unflatten(lora_name, t["hada_w1_a"].shape[0], t["hada_w1_b"].shape[1])
    if any(k.startswith("lokr_") for k in t):
        return _lokr_shape(lora_name, t)
    raise ValueError(f"{lora_name}: not a LoRA, LoCon, LoHa or LoKr module")


def _lokr_shape(lora_name: str, t: dict[str, torch.Tensor]) -> tuple[int, ...]:
    a, c = t["lokr_w1"].shape if "lokr_w1" in t else (
        t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1])
    if "lokr_w2" in t:
        b, d, *kernel = t["lokr_w2"].shape
        return (a * b, c * d, *kernel)
    if "lokr_t2" in t:
        b, d = t["lokr_w2_a"].shape[1], t["lokr_w2_b"].shape[1]
        return (a * b, c * d, *t["lokr_t2"].shape[2:])
    shape = _unflatten(lora_name, t["lokr_w2_a"].shape[0], t["lokr_w2_b"].shape[1])
    return (a * shape[0], c * shape[1], *shape[2:])


def _unflatten(lora_name: str, out_dim: int, flat_in: int) -> tuple[int, ...]:
    if _KXK_NAME.match(lora_name) and flat_in % 9 == 0:
        return (out_dim, flat_in // 9, 3, 3)
    if _CONV1X1_NAME.match(lora_name):
        return (out_dim, flat_in, 1, 1)
    return (out_dim, flat_in)


def stand_in_layer(weight_shape: tuple[int, ...]) -> nn.Module:
    """A weightless (meta) layer of that shape: what `from_tensors` builds on."""
    if len(weight_shape) == 2:
        return nn.Linear(weight_shape[1], weight_shape[0], bias=False, device="meta")
    out_dim, in_dim, kh, kw = weight_shape
    return nn.Conv2d(in_dim, out_dim, (kh, kw), padding=(kh // 2, kw // 2), bias=False,
                     device="meta")


@torch.no_grad()
def file_module(
    module_tensors: dict[str, torch.Tensor],
    base_weight_shape: tuple[int, ...] | torch.Size | None = None,
    lora_name: str = "",
) -> AdapterModule:
    """The algorithm's module rebuilt from a file module's tensors (fp32) on a
    weightless stand-in layer: its `scale`, `rank` and `scaled_delta()`.
    Raises NotAdditive for DoRA, ValueError for tensors that do not fit."""
    label = lora_name or "module"
    if "dora_scale" in module_tensors:
        raise NotAdditive(f"{label}: DoRA (dora_scale) is not an additive delta; its effect "
                          "depends on the base weight")
    module_cls = module_class_for_keys(set(module_tensors))
    if module_cls is None:
        raise ValueError(f"{label}: tensors {sorted(module_tensors)} are not a LoRA, LoCon, "
                         "LoHa or LoKr module")
    try:
        shape = tuple(base_weight_shape or weight_shape_for(lora_name, module_tensors))
        tensors = {k: v.float() for k, v in module_tensors.items()}
        return module_cls.from_tensors(label, stand_in_layer(shape), tensors, Dropout())
    except (KeyError, RuntimeError, IndexError) as exc:
        raise ValueError(f"{label}: its tensors do not fit together or the layer "
                         f"({exc})") from None


@torch.no_grad()
def delta_factors(module: AdapterModule) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(up (out, R), down (R, in * taps)) with up @ down = the module's unscaled
    delta, when its algorithm has such factors that are cheaper than the delta:
    plain LoRA's own (R = r), and a LoHa's face-split ones, since
    (A1 B1) * (A2 B2) = (A1 . A2) (B1^T . B2^T)^T row-wise (R = r^2, used while
    r^2 is below both sides). None otherwise (Tucker cores, LoKr)."""
    names = dict(module.named_parameters())
    if "lora_down.weight" in names and "lora_mid.weight" not in names:
        return names["lora_up.weight"].flatten(1), names["lora_down.weight"].flatten(1)
    if "hada_w1_a" in names and "hada_t1" not in names:
        w1_a, w1_b, w2_a, w2_b = (names[f"hada_{n}"] for n in ("w1_a", "w1_b", "w2_a", "w2_b"))
        if w1_a.shape[1] * w2_a.shape[1] < min(w1_a.shape[0], w1_b.shape[1]):
            return face_split(w1_a, w2_a), face_split(w1_b.T, w2_b.T).T
    return None


@torch.no_grad()
def module_delta(
    module_tensors: dict[str, torch.Tensor],
    base_weight_shape: tuple[int, ...] | torch.Size | None = None,
    lora_name: str = "",
) -> torch.Tensor:
    """The full scaled delta (alpha / rank applied) of one file module, fp32,
    shaped like the base weight (`base_weight_shape`, else `weight_shape_for`).

    Raises NotAdditive for a DoRA module and ValueError for tensors that are
    no known algorithm's or do not fit the shape.
    """
    return file_module(module_tensors, base_weight_shape, lora_name).scaled_delta().float()
