"""The optimizers' fast paths: fused AdamW and foreach SGD follow the
plain per-parameter loop, and they are what a run builds."""

from __future__ import annotations

import pytest
import torch

from trainer.optim import build_optimizer


def adapter_like_parameters(seed: int) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    shapes = [(4, 32), (32, 4), (4, 64), (64, 4), (2, 32, 3, 3), (32, 2, 1, 1)]
    return [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in shapes]


@pytest.mark.parametrize(("name", "flag"), [("adamw", "fused"), ("sgd", "foreach")])
def test_the_fast_optimizer_follows_the_plain_loop(name: str, flag: str) -> None:
    fast_params, plain_params = adapter_like_parameters(0), adapter_like_parameters(0)
    groups = [{"params": fast_params, "lr": 1e-2}]
    fast = build_optimizer(name, groups, weight_decay=0.01)
    assert fast.param_groups[0][flag] is True
    plain_class = type(fast)
    plain = plain_class([{"params": plain_params, "lr": 1e-2}], weight_decay=0.01,
                        **{flag: False})
    generator = torch.Generator().manual_seed(1)
    for _ in range(10):
        for a, b in zip(fast_params, plain_params, strict=True):
            grad = torch.randn(a.shape, generator=generator)
            a.grad, b.grad = grad.clone(), grad.clone()
        fast.step()
        plain.step()
    for a, b in zip(fast_params, plain_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any((a - adapter_like_parameters(0)[i]).abs().max() > 1e-3
               for i, a in enumerate(fast_params))  # they moved
