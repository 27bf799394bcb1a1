"""LoKr's training route (networks/kron_apply.py): the same values and
gradients as the built weight, and only the input and the small factors kept
for backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from networks.kron_apply import KronApply
from networks.lokr import LoKrModule
from tests.test_lokr import CASES, NAME, make_case, ours_output, randomize


@pytest.mark.parametrize("conv", [None, ((2, 1), (1, 0), (1, 2))], ids=["linear", "conv"])
def test_kron_apply_backward_equals_autograd_of_the_naive_formula(conv):
    torch.manual_seed(0)
    dtype = torch.float64
    w1 = torch.randn(2, 3, dtype=dtype, requires_grad=True)  # in = 3 * 4, out = 2 * b
    if conv is None:
        x = torch.randn(4, 12, dtype=dtype, requires_grad=True)
        w2 = torch.randn(5, 4, dtype=dtype, requires_grad=True)
    else:
        x = torch.randn(1, 12, 4, 3, dtype=dtype, requires_grad=True)
        w2 = torch.randn(2, 4, 3, 2, dtype=dtype, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *t: KronApply.apply(*t, conv), (x, w1, w2), fast_mode=True
    )


@pytest.mark.parametrize("case", CASES)
def test_training_route_equals_the_built_weight_in_value_and_gradient(case):
    base, module, x = make_case(case)
    randomize(module)
    assert module.kron_path_is_cheaper
    x.requires_grad_(True)
    params = [x, *module.parameters()]
    routed = module.delta_forward(x, scale=0.7)
    grads = torch.autograd.grad(routed.square().sum(), params)
    layer = nn.functional.linear if isinstance(base, nn.Linear) else None
    weight = module.delta_weight() * 0.7
    built = (
        layer(x, weight)
        if layer
        else nn.functional.conv2d(x, weight, None, base.stride, base.padding)
    )
    reference = torch.autograd.grad(built.square().sum(), params)
    torch.testing.assert_close(routed, built, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_prime_output_width_falls_back_to_the_built_weight():
    """out = 7 splits as 1 x 7: w1 is a single row and reshaping saves nothing."""
    base = nn.Linear(12, 7).requires_grad_(False)
    module = LoKrModule(NAME, base, 2, 3)
    randomize(module)
    assert not module.kron_path_is_cheaper
    x = torch.randn(3, 12)
    adapted = ours_output(base, module, x)
    module.merge()
    torch.testing.assert_close(base(x), adapted, rtol=1e-5, atol=1e-5)


def saved_numels(base: nn.Module, module: LoKrModule, x: torch.Tensor) -> dict[str, int]:
    """Elements autograd keeps for backward of one adapted forward, split into
    the input (x's own storage), the frozen weight, and everything else."""
    kept = {"input": 0, "other": 0, "largest_other": 0}
    x_storage = x.untyped_storage().data_ptr()

    def pack(t):
        storage = t.untyped_storage().data_ptr()
        if storage == x_storage:
            kept["input"] = max(kept["input"], t.numel())
        elif storage != base.weight.untyped_storage().data_ptr():
            kept["other"] += t.numel()
            kept["largest_other"] = max(kept["largest_other"], t.numel())
        return t

    module.attach()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = base(x)
    out.square().mean().backward()  # the loss's own saved output is not counted
    module.detach()
    return kept


def test_training_step_on_a_1280_linear_keeps_only_the_input_and_the_factors():
    base = nn.Linear(1280, 1280).requires_grad_(False)
    module = LoKrModule(NAME, base, rank=8, alpha=8)  # w1 (32, 32), w2 = (40, 8) @ (8, 40)
    randomize(module)
    x = torch.randn(2, 256, 1280, requires_grad=True)
    kept = saved_numels(base, module, x)
    factor_numel = sum(p.numel() for p in module.parameters())
    # The built route would keep a 1280 x 1280 delta; plain autograd of the
    # reshaping route keeps a tokens x 1280 intermediate. Neither is kept here.
    assert kept["input"] == x.numel()
    assert kept["other"] <= 3 * factor_numel < base.weight.numel() / 100
    assert module.lokr_w1.grad.abs().sum() > 0 and module.lokr_w2_a.grad.abs().sum() > 0


def test_conv_training_step_keeps_only_the_input_and_the_factors():
    base = nn.Conv2d(64, 64, 3, padding=1).requires_grad_(False)
    module = LoKrModule(NAME, base, rank=2, alpha=2)
    randomize(module)
    x = torch.randn(2, 64, 16, 16, requires_grad=True)
    kept = saved_numels(base, module, x)
    assert kept["input"] == x.numel()
    assert kept["largest_other"] < base.weight.numel() / 10


def test_autocast_runs_the_training_route_in_bf16_and_backpropagates():
    base, module, x = make_case("conv3x3-strided")
    randomize(module)
    module.attach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = base(x)
    out.float().square().mean().backward()
    module.detach()
    with torch.no_grad():
        reference = ours_output(base, module, x)
    torch.testing.assert_close(out.float(), reference, atol=0.1, rtol=0.05)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in module.parameters())
