"""networks.lowrank: the SVD truncation, kohya's dynamic-rank rules, and the
full delta of a file module for every algorithm."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from networks.base import Dropout
from networks.lowrank import (
    NotAdditive,
    delta_factors,
    dynamic_rank,
    factored_svd,
    from_svd,
    low_rank,
    module_delta,
    weight_shape_for,
)
from networks.registry import module_class


def _random(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [(12, 20), (8, 6, 3, 3)])
def test_full_rank_reproduces_the_delta_in_kohya_layout(shape):
    delta = _random(*shape)
    full = min(shape[0], math.prod(shape[1:]))
    lr = low_rank(delta, 10_000)  # capped at the full rank
    assert lr.rank == full
    if len(shape) == 2:
        assert lr.up.shape == (shape[0], full) and lr.down.shape == (full, shape[1])
    else:
        assert lr.up.shape == (shape[0], full, 1, 1) and lr.down.shape == (full, *shape[1:])
    torch.testing.assert_close(lr.delta(), delta, rtol=1e-5, atol=1e-5)
    assert lr.error == pytest.approx(0.0, abs=1e-9)
    assert lr.kept_fraction == pytest.approx(1.0)


@pytest.mark.parametrize("shape", [(12, 20), (8, 6, 3, 3)])
def test_truncation_error_is_the_discarded_singular_values(shape):
    delta = _random(*shape, seed=1)
    s = torch.linalg.svdvals(delta.reshape(shape[0], -1).double())
    for rank in (1, 3, 5):
        lr = low_rank(delta, rank)
        error = float(torch.linalg.norm((delta - lr.delta()).double()))
        expected = float(s[rank:].pow(2).sum().sqrt())
        assert error == pytest.approx(expected, rel=1e-4)
        assert lr.error == pytest.approx(expected, rel=1e-4)
        kept = float((s[:rank].pow(2).sum() / s.pow(2).sum()).sqrt())
        assert lr.kept_fraction == pytest.approx(kept, rel=1e-5)
        # no other rank-r matrix does better: e.g. a random one's best scaling
        other = _random(shape[0], rank, seed=2) @ _random(rank, math.prod(shape[1:]), seed=3)
        flat = delta.reshape(shape[0], -1)
        coef = float((other * flat).sum() / (other * other).sum())
        assert float(torch.linalg.norm(flat - coef * other)) > error


def test_singular_values_split_evenly_between_up_and_down():
    lr = low_rank(_random(12, 20, seed=4), 4)
    root = lr.singular_values[:4].sqrt()
    torch.testing.assert_close(lr.up.norm(dim=0), root, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lr.down.norm(dim=1), root, rtol=1e-5, atol=1e-6)


# s = 8, 4, 2, 1, 0.5, 0.25: sum 15.75, cumulative fractions .508 .762 .889 .952 .984 1;
# squares 64 16 4 1 .25 .0625: cumulative fractions .750 .938 .985 .997 .9993 1.
SPECTRUM = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25])


@pytest.mark.parametrize(("method", "value", "max_rank", "expected"), [
    # kohya keeps 1 + the bare rule's rank (rank_resize adds 1 to index_*)
    ("sv_ratio", 4.0, 99, 3),  # s > 8/4 = 2: {8, 4} -> 2, + 1
    ("sv_ratio", 3.0, 99, 3),  # s > 2.67: {8, 4}
    ("sv_ratio", 1.0, 99, 2),  # s > 8: none, clamped to 1, + 1
    ("sv_ratio", 100.0, 99, 6),  # all 6 > 0.08, clamped to n - 1 = 5, + 1
    ("sv_ratio", 100.0, 4, 4),  # capped by the max rank
    ("sv_cumulative", 0.75, 99, 3),  # first fraction >= .75 is .762 at r = 2
    ("sv_cumulative", 0.5, 99, 2),  # .508 at r = 1
    ("sv_cumulative", 0.99, 99, 6),  # r = 6, clamped to 5, + 1
    ("sv_fro", 0.9, 99, 3),  # squares' fraction >= 0.81: .938 at r = 2
    ("sv_fro", 0.8, 99, 2),  # >= 0.64: .750 at r = 1
    ("sv_fro", 0.999, 2, 2),  # >= .998: r = 5 -> 6, capped at 2
])  # fmt: skip
def test_dynamic_rank_follows_kohya(method, value, max_rank, expected):
    assert dynamic_rank(SPECTRUM, method, value, max_rank) == expected


def test_dynamic_rank_of_a_zero_matrix_is_one():
    assert dynamic_rank(torch.zeros(6), "sv_fro", 0.9, 8) == 1
    with pytest.raises(ValueError, match="unknown dynamic method"):
        dynamic_rank(SPECTRUM, "sv_magic", 0.9, 8)


CONV_NAME = "lora_unet_down_blocks_0_resnets_0_conv1"
MODULE_CASES = [
    (algorithm, layer, options)
    for algorithm in ("lora", "loha", "lokr")
    for layer in ("linear", "conv")
    for options in ({}, {"tucker": True})
]


@pytest.mark.parametrize(("algorithm", "layer", "options"), MODULE_CASES)
def test_module_delta_is_the_algorithms_scaled_delta(algorithm, layer, options):
    torch.manual_seed(5)
    base, name = (nn.Linear(20, 12), "lora_te_text_model_encoder_layers_0_mlp_fc1") if (
        layer == "linear") else (nn.Conv2d(6, 8, 3, padding=1), CONV_NAME)
    module = module_class(algorithm)(name, base, 3, 1.5, Dropout(), **options)
    for param in module.parameters():
        param.data.normal_()
    tensors = dict(module.state_dict())
    assert weight_shape_for(name, tensors) == tuple(base.weight.shape)
    expected = module.scaled_delta()
    assert float(expected.abs().max()) > 0
    torch.testing.assert_close(module_delta(tensors, lora_name=name), expected)
    torch.testing.assert_close(module_delta(tensors, base.weight.shape), expected)


def test_module_delta_refuses_dora_and_unknown_tensors():
    module = module_class("lora")("m", nn.Linear(6, 4), 2, 2.0, Dropout())
    module.enable_dora()
    with pytest.raises(NotAdditive, match="DoRA"):
        module_delta(dict(module.state_dict()))
    with pytest.raises(ValueError, match="not a LoRA"):
        module_delta({"weird.weight": torch.zeros(2, 2)})


def test_factored_svd_is_the_svd_of_the_product():
    up, down = _random(12, 3, seed=6), _random(3, 2, 3, 3, seed=7)
    delta = (up @ down.flatten(1)).reshape(12, 2, 3, 3)
    u, s, vh = factored_svd(up, down)
    assert s.shape == (12,) and float(s[3:].abs().max()) == 0  # padded to min(12, 18)
    torch.testing.assert_close(s, torch.linalg.svdvals(delta.flatten(1)), rtol=1e-4, atol=1e-5)
    lr = from_svd(u, s, vh, 2, delta.shape)
    torch.testing.assert_close(lr.delta(), low_rank(delta, 2).delta(), rtol=1e-4, atol=1e-5)
    assert from_svd(u, s, vh, 10, delta.shape).rank == 3  # never more than the factors hold


@pytest.mark.parametrize(("algorithm", "options", "has_factors"), [
    ("lora", {}, True), ("loha", {}, True), ("lora", {"tucker": True}, False),
    ("lokr", {}, False)])
def test_delta_factors_multiply_to_the_delta(algorithm, options, has_factors):
    torch.manual_seed(8)
    module = module_class(algorithm)("m", nn.Conv2d(6, 16, 3), 2, 2.0, Dropout(), **options)
    for param in module.parameters():
        param.data.normal_()
    factors = delta_factors(module)
    assert (factors is not None) == has_factors
    if factors:
        torch.testing.assert_close((factors[0] @ factors[1]).reshape(16, 6, 3, 3),
                                   module.delta_weight(), rtol=1e-5, atol=1e-5)
