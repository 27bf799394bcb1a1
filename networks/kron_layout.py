"""Which tensors a LoKr module has: LyCORIS' split of a layer's dimensions
(`factorization`), the choice of full or low-rank factors (`plan_layout`), and
the same read back from a file's tensor shapes (`layout_from_tensors`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split `dimension` into (m, n), m <= n, m * n = dimension, as LyCORIS does.

    A positive factor that divides the dimension is used as it is. Otherwise
    m climbs the divisors of the dimension, never past `factor` (-1: no bound),
    until it reaches the square root: the most balanced split the bound allows.
    """
    if factor > 0 and dimension % factor == 0:
        m, n = sorted((factor, dimension // factor))
        return m, n
    bound = dimension if factor < 0 else factor
    m = 1
    while m < dimension // m:
        step = next(d for d in range(m + 1, dimension + 1) if dimension % d == 0)
        if step > bound:
            break
        m = step
    small, large = sorted((m, dimension // m))
    return small, large


@dataclass(frozen=True)
class KronLayout:
    """Which tensors a LoKr module has. out = a * b, in = c * d.

    w1_rank / w2_rank: None when that factor is a full matrix (`lokr_w1`,
    `lokr_w2`), else the rank of its `_a @ _b` product.
    """

    out_split: tuple[int, int]
    in_split: tuple[int, int]
    kernel: tuple[int, ...] = ()
    w1_rank: int | None = None
    w2_rank: int | None = None
    tucker: bool = False

    @property
    def rank(self) -> int | None:
        """The rank loaders divide alpha by (w2's first, as A1111 and ComfyUI)."""
        return self.w2_rank if self.w2_rank is not None else self.w1_rank

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """File tensor name -> shape (w2_b is stored flattened, as LyCORIS writes it)."""
        (a, b), (c, d) = self.out_split, self.in_split
        shapes: dict[str, tuple[int, ...]] = {}
        if self.w1_rank is None:
            shapes["lokr_w1"] = (a, c)
        else:
            shapes["lokr_w1_a"], shapes["lokr_w1_b"] = (a, self.w1_rank), (self.w1_rank, c)
        r = self.w2_rank
        if r is None:
            shapes["lokr_w2"] = (b, d, *self.kernel)
        elif self.tucker:
            shapes["lokr_w2_a"], shapes["lokr_w2_b"] = (r, b), (r, d)
            shapes["lokr_t2"] = (r, r, *self.kernel)
        else:
            shapes["lokr_w2_a"], shapes["lokr_w2_b"] = (b, r), (r, d * math.prod(self.kernel))
        return shapes


def plan_layout(
    weight_shape: torch.Size | tuple[int, ...],
    rank: int,
    factor: int = -1,
    decompose_both: bool = False,
    full_matrix: bool = False,
    tucker: bool = False,
) -> KronLayout:
    """LyCORIS' choice of tensors for a layer: w2 is factorised unless the rank
    is at least half its larger side (or `full_matrix`), w1 only with
    `decompose_both` and under the same condition on its own sides."""
    out_dim, in_dim, *kernel = weight_shape
    (a, b), (c, d) = factorization(out_dim, factor), factorization(in_dim, factor)
    w1_small = rank < max(a, c) / 2
    w1_rank = rank if decompose_both and w1_small and not full_matrix else None
    w2_rank = None if full_matrix or rank >= max(b, d) / 2 else rank
    tucker = tucker and w2_rank is not None and any(k != 1 for k in kernel)
    return KronLayout((a, b), (c, d), tuple(kernel), w1_rank, w2_rank, tucker)


def layout_from_tensors(
    tensors: dict[str, torch.Tensor], weight_shape: torch.Size | tuple[int, ...]
) -> KronLayout:
    """The layout a file's tensors describe for a layer of `weight_shape`.

    Read from the shapes, not from a factor option: a file may come from a
    tool that split the dimensions otherwise (LyCORIS' unbalanced factorisation).
    """
    out_dim, in_dim, *kernel = weight_shape
    if "lokr_w1" in tensors:
        (a, c), w1_rank = tensors["lokr_w1"].shape, None
    else:
        a, w1_rank = tensors["lokr_w1_a"].shape
        c = tensors["lokr_w1_b"].shape[1]
    if out_dim % a or in_dim % c:
        raise ValueError(f"a ({a}, {c}) lokr_w1 does not divide a {tuple(weight_shape)} weight")
    w2_rank = None if "lokr_w2" in tensors else tensors["lokr_w2_b"].shape[0]
    tucker = "lokr_t2" in tensors
    return KronLayout((a, out_dim // a), (c, in_dim // c), tuple(kernel), w1_rank, w2_rank, tucker)


def factor_for_layouts(layouts: list[KronLayout]) -> int | None:
    """A `factor` option that reproduces every module's split (-1 preferred),
    or None if none does (a file split otherwise, e.g. LyCORIS' unbalanced
    mode). Network-wide because one module alone cannot tell f from dim / f."""
    if not layouts:
        return None
    sides = {side for lay in layouts for side in (*lay.out_split, *lay.in_split)}
    for factor in (-1, *sorted(sides)):
        if all(reproduces(lay, factor) for lay in layouts):
            return factor
    return None


def reproduces(layout: KronLayout, factor: int) -> bool:
    (a, b), (c, d) = layout.out_split, layout.in_split
    return factorization(a * b, factor) == (a, b) and factorization(c * d, factor) == (c, d)
