"""LoKr: delta W = kron(w1, w2), a Kronecker product of a small and a larger
factor (LyCORIS, Yeh et al. 2023, arXiv:2309.14859).

The layer's output dimension is split as out = a * b and its input as
in = c * d (`factorization`); w1 is (a, c) and w2 is (b, d), with a conv's
kernel kept in w2: (b, d, k, k). Either factor may itself be a low-rank
product (`lokr_w1_a @ lokr_w1_b`, `lokr_w2_a @ lokr_w2_b`), and a k x k w2 may
be a Tucker core `lokr_t2` between two 1x1 factors. Parameter names are the
file's tensor names, so `state_dict()` keys are the file keys.

Scale: alpha / rank, rank being the rows of `lokr_w2_b` (or of `lokr_w1_b`
when only w1 is factorised), which is how A1111 and ComfyUI read a file. With
no factorised factor there is no rank: every loader then applies scale 1, and
LyCORIS writes alpha = the configured dim so that the file says so too. A
missing alpha also means scale 1.

Training never builds kron(w1, w2) where the factors are cheaper to apply one
after the other: with x reshaped to X (c, d) row-major, the output reshaped to
(a, b) is w1 X w2^T (column-major: (w1 (x) w2) vec(X) = vec(w2 X w1^T)). For a
conv the same holds with "X w2^T" a convolution of the c channel groups of x
with w2 (networks/kron_apply.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .algorithms import FACTOR
from .base import AdapterModule, Dropout, apply_weight, first_dim, shape_text
from .kron_apply import kron_apply
from .kron_layout import (
    KronLayout,
    factor_for_layouts,
    layout_from_tensors,
    plan_layout,
    reproduces,
)
from .loha import rebuild_tucker


def _factor_arg(text) -> int | None:
    """A `ss_network_args` factor, None when absent or not one."""
    try:
        return FACTOR.from_arg(str(text)) if text is not None else None
    except ValueError:
        return None


def kron_factors(
    tensors: dict[str, torch.Tensor], layout: KronLayout
) -> tuple[torch.Tensor, torch.Tensor]:
    """(w1 (a, c), w2 (b, d[, k, k])) from file-layout tensors: both small."""
    if layout.w1_rank is None:
        w1 = tensors["lokr_w1"]
    else:
        w1 = tensors["lokr_w1_a"] @ tensors["lokr_w1_b"]
    (_, b), (_, d) = layout.out_split, layout.in_split
    if layout.w2_rank is None:
        w2 = tensors["lokr_w2"]
    elif layout.tucker:
        w2 = rebuild_tucker(tensors["lokr_t2"], tensors["lokr_w2_a"], tensors["lokr_w2_b"])
    else:
        w2 = tensors["lokr_w2_a"] @ tensors["lokr_w2_b"].flatten(1)
    return w1.reshape(w1.shape[0], -1), w2.reshape(b, d, *layout.kernel)


def kron_delta(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """kron(w1, w2) with a conv's kernel dimensions taken from w2 alone."""
    # torch.kron views its inputs: a Tucker-rebuilt w2 must be made contiguous.
    return torch.kron(w1.reshape(*w1.shape, *[1] * (w2.dim() - 2)), w2.contiguous())


def lokr_delta_weight(
    tensors: dict[str, torch.Tensor], weight_shape: torch.Size | tuple[int, ...]
) -> torch.Tensor:
    """Unscaled delta W from a file's tensors for a layer of `weight_shape`."""
    layout = layout_from_tensors(tensors, weight_shape)
    return kron_delta(*kron_factors(tensors, layout)).reshape(weight_shape)


def lokr_file_scale(tensors: dict[str, torch.Tensor]) -> float:
    """The scale A1111, ComfyUI and LyCORIS apply to a file's LoKr module."""
    if "lokr_w2_b" in tensors:
        rank = tensors["lokr_w2_b"].shape[0]
    elif "lokr_w1_b" in tensors:
        rank = tensors["lokr_w1_b"].shape[0]
    else:
        return 1.0
    return float(tensors["alpha"]) / rank if "alpha" in tensors else 1.0


class LoKrModule(AdapterModule):
    """LoKr on a Linear or conv layer (k x k convs as LoCon places them).

    factor: -1 splits each dimension as close to its square root as possible;
    a positive factor that divides a dimension splits it as factor x dim/factor,
    w1 taking the smaller side (LyCORIS `factor`).
    decompose_both: w1 is factorised too. full_matrix: w2 is never factorised.
    tucker: a k x k w2 is a Tucker core `lokr_t2` between 1x1 factors.
    layout: the exact tensors to make, overriding the four options (file loading).
    """

    algorithm = "lokr"

    def __init__(
        self,
        lora_name: str,
        base: nn.Module,
        rank: int,
        alpha: float,
        dropout: Dropout = Dropout(),
        tucker: bool = False,
        factor: int = -1,
        decompose_both: bool = False,
        full_matrix: bool = False,
        *,
        layout: KronLayout | None = None,
    ):
        if layout is None:
            shape = base.weight.shape
            layout = plan_layout(shape, rank, factor, decompose_both, full_matrix, tucker)
        if layout.rank is None:
            # No factorised factor: LyCORIS records alpha = dim, so the file says scale 1.
            alpha = rank
        super().__init__(lora_name, base, layout.rank or rank, alpha, dropout)
        self.layout = layout
        for name, shape in layout.tensor_shapes().items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """LyCORIS' init: the w2 side ends in zeros, so delta W starts at exactly 0."""
        params = dict(self.named_parameters())
        for name in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_t2"):
            if name in params:
                nn.init.kaiming_uniform_(params[name], a=math.sqrt(5))
        nn.init.zeros_(params["lokr_w2"] if "lokr_w2" in params else params["lokr_w2_b"])

    @property
    def scale(self) -> float:
        return 1.0 if self.layout.rank is None else super().scale

    @property
    def tucker(self) -> bool:
        return self.layout.tucker

    def file_options(self) -> dict[str, object]:
        """What the tensors prove; an option they say nothing about is left out
        (the file's `ss_network_args` then tells). A full factor may be
        LyCORIS' own choice for a high rank, so only a factorised one proves
        full_matrix False; w1 is factorised only with decompose_both, and a whole
        w1 next to a factorised w2 small enough for it proves decompose_both
        False; Tucker shows only on a k x k conv with a factorised w2.
        `factor` is network-wide (`network_options`)."""
        options = super().file_options()
        lay = self.layout
        kxk = any(k != 1 for k in lay.kernel)
        if not (kxk and lay.w2_rank is not None):
            options.pop("tucker", None)
        if lay.w1_rank is not None:
            options["decompose_both"] = True
        elif lay.w2_rank is not None and lay.w2_rank < max(lay.out_split[0], lay.in_split[0]) / 2:
            options["decompose_both"] = False
        if lay.rank is not None:
            options["full_matrix"] = False
        return options

    @classmethod
    def network_options(
        cls, adapters: list[AdapterModule], args: dict | None = None
    ) -> dict[str, object]:
        """The booleans as the base class reads them, and `factor`: the file's
        `ss_network_args` factor when it reproduces every module's split, else
        the one `factor_for_layouts` finds, else the recorded one (a split no
        factor makes, such as LyCORIS' unbalanced mode, loads from its shapes)."""
        options = super().network_options(adapters, args)
        layouts = [a.layout for a in adapters if isinstance(a, LoKrModule)]
        given = _factor_arg((args or {}).get("factor"))
        if given is not None and layouts and all(reproduces(lay, given) for lay in layouts):
            options["factor"] = given
        elif (found := factor_for_layouts(layouts)) is not None:
            options["factor"] = found
        elif given is not None:
            options["factor"] = given
        return options

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return kron_factors(dict(self.named_parameters()), self.layout)

    def delta_weight(self) -> torch.Tensor:
        return kron_delta(*self.factors()).reshape(self.base.weight.shape)

    @property
    def kron_path_is_cheaper(self) -> bool:
        """Per-output-position multiply-adds of applying w2 then w1, against one
        full-size op with the built weight (also the case that needs no reshaping
        trick: grouped convs and string paddings fall back)."""
        base = self.base
        if getattr(base, "groups", 1) != 1 or isinstance(getattr(base, "padding", 0), str):
            return False
        (a, b), (c, d) = self.layout.out_split, self.layout.in_split
        taps = math.prod(self.layout.kernel)
        return c * b * d * taps + a * b * c <= a * b * c * d * taps

    def delta_forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        w1, w2 = self.factors()
        w1 = w1 * scale  # the smallest tensor carries the scale
        if self.kron_path_is_cheaper:
            out = kron_apply(self.base, x, w1, w2)
        else:
            out = apply_weight(self.base, x, kron_delta(w1, w2).reshape(self.base.weight.shape))
        out = self._drop_output_rows(out)
        if self.training and self.dropout.neuron:
            out = F.dropout(out, self.dropout.neuron)
        return out

    def _drop_output_rows(self, out: torch.Tensor) -> torch.Tensor:
        """LoKr has no rank-wide activation; like LyCORIS, rank dropout drops
        rows of delta W (output channels), rescaled to keep the expectation."""
        p = self.dropout.rank
        if not (self.training and p):
            return out
        channel_dim = -1 if isinstance(self.base, nn.Linear) else 1
        shape = [1] * out.dim()
        shape[channel_dim] = out.shape[channel_dim]
        keep = torch.rand(shape, device=out.device) > p
        return out * (keep.to(out.dtype) / (1 - p))

    # --- file format ----------------------------------------------------
    @classmethod
    def check_file_tensors(cls, t: dict[str, torch.Tensor]) -> tuple[int | str, str | None]:
        """The module's rank ("full" when neither factor is factorised: scale 1)
        and, when its tensors do not make one layer's delta, why. Without the
        base layer the split itself cannot be checked; loading does that."""
        rank = "full"
        for name in ("lokr_w2_b", "lokr_w1_b"):
            if name in t:
                rank = first_dim(t[name])
                break
        for i in (1, 2):
            whole, a, b = (t.get(f"lokr_w{i}{s}") for s in ("", "_a", "_b"))
            if whole is not None and (a is not None or b is not None):
                return rank, f"lokr_w{i} is stored both whole and as lokr_w{i}_a/_b"
        shapes = ", ".join(f"{k} {shape_text(v)}" for k, v in sorted(t.items())
                           if k.startswith("lokr_"))
        w1_a, w1_b = t.get("lokr_w1_a"), t.get("lokr_w1_b")
        w2_a, w2_b, t2 = t.get("lokr_w2_a"), t.get("lokr_w2_b"), t.get("lokr_t2")
        w1, w2 = t.get("lokr_w1"), t.get("lokr_w2")
        two_d = [x for x in (w1, w1_a, w1_b, w2_a, w2_b) if x is not None]
        if any(x.dim() != 2 for x in two_d) or (w2 is not None and w2.dim() not in (2, 4)):
            return rank, f"the lokr factors are not matrices (w2 may be a 4-D kernel) ({shapes})"
        if w1_a is not None and w1_a.shape[1] != w1_b.shape[0]:
            return rank, f"lokr_w1_a and lokr_w1_b do not multiply ({shapes})"
        if t2 is not None:
            if w2_a is None or t2.dim() != 4 or t2.shape[:2] != (w2_a.shape[0], w2_b.shape[0]):
                return rank, (f"the Tucker lokr_t2 does not chain with lokr_w2_a and lokr_w2_b "
                              f"(rank x rank x k x k, rank x out, rank x in) ({shapes})")
        elif w2_a is not None and w2_a.shape[1] != w2_b.shape[0]:
            return rank, f"lokr_w2_a and lokr_w2_b do not multiply ({shapes})"
        return rank, None

    @classmethod
    def from_tensors(
        cls, lora_name: str, base: nn.Module, tensors: dict[str, torch.Tensor], dropout: Dropout
    ) -> LoKrModule:
        """Raises KeyError naming the module when its tensors do not fit the layer."""
        try:
            layout = layout_from_tensors(tensors, base.weight.shape)
        except ValueError as exc:
            raise KeyError(f"{lora_name}: {exc}") from None
        wanted = layout.tensor_shapes()
        for name, shape in wanted.items():
            if name not in tensors or tensors[name].numel() != math.prod(shape):
                got = shape_text(tensors[name]) if name in tensors else "nothing"
                raise KeyError(f"{lora_name}: its LoKr factors do not make a "
                               f"{tuple(base.weight.shape)} weight ({name} is {got}, not "
                               f"{shape})")
        alpha = float(tensors["alpha"]) if "alpha" in tensors else None
        rank = layout.rank
        if rank is None:
            # Full factors have no rank; LyCORIS writes the configured dim as alpha.
            rank = max(1, round(alpha)) if alpha else 1
        module = cls(
            lora_name, base, rank, rank if alpha is None else alpha, dropout, layout=layout
        )
        module.load_file_tensors(tensors)
        return module
