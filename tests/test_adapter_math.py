"""The pure math of each algorithm, checked against a second route: autograd
of the naive formula, the layer-level forward, and LyCORIS' functional API."""

from __future__ import annotations

import pytest
import torch
from lycoris.functional import loha as lycoris_loha
from torch import nn

from networks.base import Dropout
from networks.loha import HadamardDelta, LoHaModule, loha_delta_weight
from networks.lora import LoRAModule, lora_delta_weight


def test_hadamard_backward_equals_autograd_of_the_naive_product():
    torch.manual_seed(0)
    factors = [
        torch.randn(s, dtype=torch.float64, requires_grad=True) for s in [(6, 3), (3, 5)] * 2
    ]
    assert torch.autograd.gradcheck(HadamardDelta.apply, factors)


def test_tucker_lora_delta_equals_the_chained_convolutions():
    torch.manual_seed(0)
    base = nn.Conv2d(5, 7, 3, padding=1)
    module = LoRAModule("lora_unet_x", base, rank=3, alpha=3, tucker=True)
    nn.init.normal_(module.lora_up.weight)
    x = torch.randn(2, 5, 8, 8)
    via_weight = nn.functional.conv2d(x, module.delta_weight(), padding=1)
    torch.testing.assert_close(module.delta_forward(x), via_weight, rtol=1e-5, atol=1e-5)
    assert module.delta_weight().shape == base.weight.shape


@pytest.mark.parametrize("tucker", [False, True])
def test_loha_delta_matches_lycoris_functional(tucker):
    torch.manual_seed(0)
    base = nn.Conv2d(5, 7, 3, padding=1)
    module = LoHaModule("lora_unet_x", base, rank=3, alpha=3, dropout=Dropout(), tucker=tucker)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    t = dict(module.named_parameters())
    if tucker:
        # LyCORIS order: (w1d, w1u, w2d, w2u, t1, t2) = (w*_b, w*_a, ..., t1, t2)
        args = (
            t["hada_w1_b"],
            t["hada_w1_a"],
            t["hada_w2_b"],
            t["hada_w2_a"],
            t["hada_t1"],
            t["hada_t2"],
        )
    else:
        args = (t["hada_w1_b"], t["hada_w1_a"], t["hada_w2_b"], t["hada_w2_a"], None, None)
    reference = lycoris_loha.diff_weight(*args, gamma=torch.tensor(1.0), backend="torch")
    torch.testing.assert_close(module.delta_weight(), reference.reshape(base.weight.shape))


def test_fresh_loha_and_lora_deltas_are_exactly_zero():
    base = nn.Linear(8, 6)
    for cls in (LoRAModule, LoHaModule):
        assert torch.count_nonzero(cls("lora_unet_x", base, rank=2, alpha=1).delta_weight()) == 0


def test_file_layout_functions_agree_with_modules():
    torch.manual_seed(0)
    down, up = torch.randn(4, 6, 3, 3), torch.randn(5, 4, 1, 1)
    assert lora_delta_weight(down, up).shape == (5, 6, 3, 3)
    tensors = {
        f"hada_w{i}_{s}": torch.randn(*shape)
        for i in (1, 2)
        for s, shape in (("a", (5, 4)), ("b", (4, 6)))
    }
    delta = loha_delta_weight(tensors, torch.Size([5, 6]))
    naive = (tensors["hada_w1_a"] @ tensors["hada_w1_b"]) * (
        tensors["hada_w2_a"] @ tensors["hada_w2_b"]
    )
    torch.testing.assert_close(delta, naive)


LOHA_LAYERS = {
    "linear": lambda: nn.Linear(40, 48),
    "conv": lambda: nn.Conv2d(24, 32, 3, stride=2, padding=1),
    "conv-tucker": lambda: nn.Conv2d(24, 32, 3, padding=1),
}


@pytest.mark.parametrize("layer", list(LOHA_LAYERS))
def test_loha_factorised_path_equals_the_built_delta_weight_in_value_and_gradient(layer):
    """The rank-r^2 path (no full-size product) and the built delta weight are two
    routes to one number; gradients of every factor must agree too."""
    torch.manual_seed(0)
    base = LOHA_LAYERS[layer]()
    module = LoHaModule("lora_unet_x", base, rank=3, alpha=2, tucker=layer == "conv-tucker")
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    assert module.factorised_path_is_cheaper
    x = torch.randn(2, 40) if layer == "linear" else torch.randn(2, 24, 9, 9)
    factorised = module.delta_forward(x, scale=0.7)
    grads = torch.autograd.grad(factorised.square().sum(), list(module.parameters()))
    built = (
        nn.functional.linear(x, module.delta_weight() * 0.7)
        if layer == "linear"
        else (nn.functional.conv2d(x, module.delta_weight() * 0.7, None, base.stride, base.padding))
    )
    reference = torch.autograd.grad(built.square().sum(), list(module.parameters()))
    torch.testing.assert_close(factorised, built, rtol=1e-4, atol=1e-4)
    for got, want in zip(grads, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


def test_loha_builds_the_delta_weight_when_the_rank_is_too_high_to_factorise():
    base = nn.Linear(40, 48)
    assert not LoHaModule("lora_unet_x", base, rank=16, alpha=1).factorised_path_is_cheaper
    assert LoHaModule("lora_unet_x", base, rank=4, alpha=1).factorised_path_is_cheaper


def test_loha_training_step_keeps_no_full_size_tensor_for_backward():
    base = nn.Linear(256, 256).requires_grad_(False)
    module = LoHaModule("lora_unet_x", base, rank=4, alpha=4)
    nn.init.normal_(module.hada_w2_a)
    module.attach()
    x = torch.randn(1, 8, 256, requires_grad=True)
    kept = []

    def pack(t):
        if t.data_ptr() != base.weight.data_ptr():  # the frozen op keeps W itself anyway
            kept.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = base(x).square().mean()
    loss.backward()
    module.detach()
    assert kept and max(kept) < base.weight.numel() / 4
    assert module.hada_w1_a.grad is not None and module.hada_w1_a.grad.abs().sum() > 0


@pytest.mark.parametrize("cls", [LoRAModule, LoHaModule])
@pytest.mark.parametrize(
    "make_base, shape",
    [
        (lambda: nn.Linear(32, 24), (2, 5, 32)),
        (lambda: nn.Conv2d(8, 6, 3, padding=1), (2, 8, 6, 6)),
    ],
    ids=["linear", "conv"],
)
def test_bf16_model_with_fp32_adapters_matches_fp32_adapter_input(cls, make_base, shape):
    """Under autocast the adapter takes the bf16 activations as they are; the
    result must equal feeding it an fp32 copy (what it did before, at the cost
    of a cast per layer). Without autocast a bf16 model must still run."""
    torch.manual_seed(0)
    base = make_base().to(torch.bfloat16)
    module = cls("lora_unet_x", base, rank=4, alpha=2)
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0, 0.2)
    module.attach()
    x = torch.randn(shape).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hooked = base(x)
        module.enabled = False
        plain = base(x)
        expected = plain + module.delta_forward(x.float(), module.scale).to(plain.dtype)
        module.enabled = True
    assert torch.equal(hooked, expected)
    assert torch.count_nonzero(hooked - plain) > 0
    outside = base(x)
    assert outside.dtype == torch.bfloat16
    torch.testing.assert_close(outside, expected, atol=0.05, rtol=0.02)
