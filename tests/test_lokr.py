"""LoKr: identity at init, adapter forward == merged forward, the closed-form
Kronecker delta, scales, file tensors and options, and the factor read back
from a file (arXiv:2309.14859). Against lycoris-lora: tests/test_lokr_lycoris.py;
the training route: tests/test_lokr_training_route.py."""

from __future__ import annotations

import logging

import pytest
import torch
from lycoris.modules.lokr import LokrModule
from torch import nn

from networks.base import Dropout
from networks.kron_layout import factor_for_layouts
from networks.lokr import LoKrModule, lokr_file_scale
from networks.network import AdapterNetwork

NAME = "lora_unet_x"

# name -> (base layer, input shape, options); the alpha is 3 throughout.
CASES = {
    "linear": (lambda: nn.Linear(48, 40), (2, 5, 48), dict(rank=2)),
    "linear-decompose-both": (lambda: nn.Linear(48, 40), (2, 5, 48), dict(rank=2, both=True)),
    "linear-full-matrix": (lambda: nn.Linear(48, 40), (2, 5, 48), dict(rank=2, full=True)),
    "linear-factor-4": (lambda: nn.Linear(48, 40), (2, 5, 48), dict(rank=2, factor=4)),
    "conv1x1": (lambda: nn.Conv2d(48, 40, 1), (2, 48, 5, 5), dict(rank=2)),
    "conv3x3-strided": (
        lambda: nn.Conv2d(24, 32, 3, stride=2, padding=1),
        (2, 24, 9, 9),
        dict(rank=2),
    ),
    "conv3x3-full-w2": (lambda: nn.Conv2d(24, 32, 3, padding=1), (2, 24, 7, 7), dict(rank=8)),
    "conv3x3-decompose-both": (
        lambda: nn.Conv2d(24, 32, 3, padding=1),
        (2, 24, 7, 7),
        dict(rank=1, both=True),
    ),
    "conv3x3-tucker": (
        lambda: nn.Conv2d(24, 32, 3, stride=2, padding=1),
        (2, 24, 9, 9),
        dict(rank=2, tucker=True),
    ),
}


def make_case(case: str, seed: int = 0) -> tuple[nn.Module, LoKrModule, torch.Tensor]:
    torch.manual_seed(seed)
    make_base, shape, opts = CASES[case]
    base = make_base().requires_grad_(False)
    module = LoKrModule(
        NAME,
        base,
        opts["rank"],
        alpha=3,
        tucker=opts.get("tucker", False),
        factor=opts.get("factor", -1),
        decompose_both=opts.get("both", False),
        full_matrix=opts.get("full", False),
    )
    return base, module, torch.randn(shape)


def randomize(module: nn.Module) -> None:
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0, 0.3)


def lycoris_module(base: nn.Module, case: str, multiplier: float) -> LokrModule:
    """LyCORIS' own LoKr for the same layer and options (its full-matrix
    notice is expected for some cases)."""
    opts = CASES[case][2]
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    return LokrModule(
        NAME,
        base,
        multiplier=multiplier,
        lora_dim=opts["rank"],
        alpha=3,
        use_tucker=opts.get("tucker", False),
        decompose_both=opts.get("both", False),
        factor=opts.get("factor", -1),
        full_matrix=opts.get("full", False),
    )


def ours_output(base: nn.Module, module: LoKrModule, x: torch.Tensor) -> torch.Tensor:
    module.attach()
    try:
        return base(x)
    finally:
        module.detach()


def lycoris_output(module: LokrModule, x: torch.Tensor) -> torch.Tensor:
    module.apply_to()
    try:
        with torch.no_grad():
            return module(x)
    finally:
        module.restore()


# --- the closed form, written here independently of networks/lokr.py -----------


def expected_factors(t: dict[str, torch.Tensor], kernel: tuple[int, ...]):
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    elif "lokr_t2" in t:
        # t2 (r, r, k, k): its first index meets w2_a (r, b), its second w2_b (r, d).
        w2 = torch.einsum(
            "r s h w, r b, s d -> b d h w", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"]
        )
    else:
        w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
    # torch.kron views its arguments, so the einsum's result must be contiguous.
    return w1, w2.reshape(w2.shape[0], -1, *kernel).contiguous()


def expected_delta(t: dict[str, torch.Tensor], weight_shape: torch.Size) -> torch.Tensor:
    kernel = tuple(weight_shape[2:])
    w1, w2 = expected_factors(t, kernel)
    return torch.kron(w1.reshape(*w1.shape, *[1] * len(kernel)), w2).reshape(weight_shape)


def expected_scale(t: dict[str, torch.Tensor]) -> float:
    """A1111 / ComfyUI: alpha over the rows of the factorised w2_b (else w1_b)."""
    rank_key = next((k for k in ("lokr_w2_b", "lokr_w1_b") if k in t), None)
    return 1.0 if rank_key is None else float(t["alpha"]) / t[rank_key].shape[0]


# --- behaviour -------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_fresh_module_changes_no_output(case):
    base, module, x = make_case(case)
    assert torch.count_nonzero(module.delta_weight()) == 0
    assert torch.equal(ours_output(base, module, x), base(x))


@pytest.mark.parametrize("case", CASES)
def test_forward_equals_merged_forward_and_unmerge_restores_the_weight(case):
    base, module, x = make_case(case)
    randomize(module)
    original = base.weight.clone()
    module.attach()
    module.multiplier = 0.7
    adapted = base(x)
    assert (adapted - base.__class__.forward(base, x)).abs().max() > 1e-3
    module.merge()
    torch.testing.assert_close(base(x), adapted, rtol=1e-5, atol=1e-5)
    module.unmerge()
    assert torch.equal(base.weight, original)
    module.multiplier = 0.0
    assert torch.equal(base(x), base.__class__.forward(base, x))
    module.detach()


@pytest.mark.parametrize("case", CASES)
def test_delta_weight_is_the_kronecker_product_of_the_factors(case):
    base, module, _ = make_case(case)
    randomize(module)
    tensors = {k: v.detach() for k, v in module.state_dict().items()}
    with torch.no_grad():
        torch.testing.assert_close(
            module.delta_weight(), expected_delta(tensors, base.weight.shape)
        )
        module.multiplier = 0.7
        module.merge()
    want = module._weight_before_merge + 0.7 * expected_scale(tensors) * expected_delta(
        tensors, base.weight.shape
    )
    torch.testing.assert_close(base.weight, want)
    assert module.scale == expected_scale(tensors) == lokr_file_scale(tensors)


def test_full_factors_mean_scale_one_whatever_the_alpha():
    base, module, x = make_case("linear-full-matrix")
    assert set(module.state_dict()) == {"alpha", "lokr_w1", "lokr_w2"}
    # LyCORIS records alpha = dim for full factors, so the file says scale 1 too.
    assert module.scale == 1.0 and float(module.alpha) == 2
    for alpha in (16.0, 2.5, 0.0):
        tensors = dict(module.state_dict(), alpha=torch.tensor(alpha))
        assert LoKrModule.from_tensors(NAME, base, tensors, Dropout()).scale == 1.0, alpha


def test_missing_alpha_means_scale_one():
    base, module, _ = make_case("linear")
    tensors = {k: v for k, v in module.state_dict().items() if k != "alpha"}
    assert LoKrModule.from_tensors(NAME, base, tensors, Dropout()).scale == 1.0
    assert lokr_file_scale(tensors) == 1.0


@pytest.mark.parametrize("case", CASES)
def test_file_tensors_round_trip(case):
    base, module, x = make_case(case)
    randomize(module)
    tensors = {k: v.clone() for k, v in module.state_dict().items()}
    assert LoKrModule.recognises(set(tensors))
    loaded = LoKrModule.from_tensors(NAME, base, tensors, Dropout())
    assert loaded.state_dict().keys() == tensors.keys()
    with torch.no_grad():
        torch.testing.assert_close(ours_output(base, loaded, x), ours_output(base, module, x))


def test_an_adapter_network_of_lokr_modules_keys_its_tensors_like_the_file():
    base = nn.Linear(48, 40)
    network = AdapterNetwork([LoKrModule(NAME, base, 2, 3)])
    assert set(network.state_dict()) == {
        f"{NAME}.{k}" for k in ("alpha", "lokr_w1", "lokr_w2_a", "lokr_w2_b")
    }


def test_recognises_only_complete_lokr_modules():
    assert LoKrModule.recognises({"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"})
    assert not LoKrModule.recognises({"lokr_w1", "lokr_w2_a"})
    assert not LoKrModule.recognises({"lora_down.weight", "lora_up.weight"})


# --- lycoris-lora as the reference --------------------------------------------------

def test_rank_dropout_drops_whole_output_channels_of_the_delta():
    base, module, x = make_case("conv3x3-strided")
    randomize(module)
    module.dropout = Dropout(rank=0.5)
    module.train()
    torch.manual_seed(1)
    dropped = module.delta_forward(x)
    full = module.eval().delta_forward(x)
    per_channel = (dropped / full).transpose(0, 1).flatten(1)  # (channels, everything else)
    kept = per_channel[:, 0] != 0
    assert 0 < kept.sum() < len(kept)
    torch.testing.assert_close(per_channel[kept], torch.full_like(per_channel[kept], 2.0))
    assert torch.count_nonzero(per_channel[~kept]) == 0


def test_file_options_say_only_what_the_tensors_prove():
    base = nn.Conv2d(24, 32, 3, padding=1)  # w1 (4, 4), w2 (8, 6, 3, 3)
    tucker = LoKrModule(NAME, base, 1, 1, tucker=True, decompose_both=True).file_options()
    assert tucker["tucker"] and tucker["decompose_both"] and tucker["full_matrix"] is False
    # rank 1 would have factorised the (4, 4) w1 with decompose_both: it was off.
    plain = LoKrModule(NAME, base, 1, 1).file_options()
    assert (plain["tucker"], plain["decompose_both"], plain["full_matrix"]) == (False,) * 3
    # Whole factors may be LyCORIS' own choice for a high rank: they prove nothing.
    full = LoKrModule(NAME, base, 1, 1, full_matrix=True, tucker=True).file_options()
    assert {"tucker", "decompose_both", "full_matrix"}.isdisjoint(full)
    assert "tucker" not in LoKrModule(NAME, nn.Linear(48, 40), 2, 2).file_options()


def test_network_options_prefer_the_recorded_factor_when_the_shapes_agree():
    # 64 splits as 8 x 8 with factor 8 and with -1; factor 4 would make 4 x 16.
    modules = [LoKrModule(NAME, nn.Linear(64, 64), 4, 4, factor=8)]
    assert LoKrModule.network_options(modules)["factor"] == -1
    assert LoKrModule.network_options(modules, {"factor": "8"})["factor"] == 8
    for contradicted in ("4", "0", "x"):
        assert LoKrModule.network_options(modules, {"factor": contradicted})["factor"] == -1
    # A split no factor makes: the recorded value if any, else nothing is claimed.
    unbalanced = dict(LoKrModule(NAME, nn.Linear(320, 320), 4, 4).state_dict())
    unbalanced |= {"lokr_w1": torch.zeros(20, 16), "lokr_w2_a": torch.zeros(16, 4)}
    loaded = [LoKrModule.from_tensors(NAME, nn.Linear(320, 320), unbalanced, Dropout())]
    assert "factor" not in LoKrModule.network_options(loaded)
    assert LoKrModule.network_options(loaded, {"factor": "16"})["factor"] == 16


def test_tensors_that_do_not_fit_the_layer_are_refused_naming_the_module():
    tensors = dict(LoKrModule(NAME, nn.Linear(48, 40), 2, 3).state_dict())  # w1 (5, 6)
    with pytest.raises(KeyError, match=r"lokr_w1 does not divide a \(42, 48\) weight"):
        LoKrModule.from_tensors(NAME, nn.Linear(48, 42), tensors, Dropout())
    with pytest.raises(KeyError, match=r"lokr_w2_b is \(2, 8\), not \(2, 16\)"):
        LoKrModule.from_tensors(NAME, nn.Linear(96, 40), tensors, Dropout())


@pytest.mark.parametrize("factor", [-1, 4, 8, 16, 24])
def test_the_factor_is_recovered_from_a_networks_layouts(factor):
    layers = [nn.Linear(320, 320), nn.Linear(768, 640), nn.Conv2d(1280, 640, 3, device="meta")]
    layouts = [LoKrModule(NAME, layer, 4, 4, factor=factor).layout for layer in layers]
    assert factor_for_layouts(layouts) == factor


def test_no_factor_is_claimed_for_a_split_no_factor_makes():
    # LyCORIS' unbalanced mode puts the larger output side in w1: (20, 16) for 320.
    base = nn.Linear(320, 320)
    tensors = dict(LoKrModule(NAME, base, 4, 4).state_dict())
    tensors["lokr_w1"] = torch.zeros(20, 16)
    tensors["lokr_w2_a"] = torch.zeros(16, 4)
    loaded = LoKrModule.from_tensors(NAME, base, tensors, Dropout())
    assert loaded.layout.out_split == (20, 16)
    assert factor_for_layouts([loaded.layout]) is None
