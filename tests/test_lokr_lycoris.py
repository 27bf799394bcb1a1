"""LoKr against lycoris-lora 4.1 (arXiv:2309.14859): the same factorisation
and file tensor shapes for SD1.5's layers, lycoris' own modules giving our
outputs for our tensors, and its files (balanced or not) loading into ours
with the same outputs. Ours alone: tests/test_lokr.py."""

from __future__ import annotations

import logging

import pytest
import torch
from lycoris.functional.general import factorization as lycoris_factorization
from lycoris.modules import get_module, make_module
from lycoris.modules.lokr import LokrModule
from torch import nn

from networks.base import Dropout
from networks.kron_layout import factorization
from networks.lokr import LoKrModule
from tests.test_lokr import (
    CASES,
    NAME,
    lycoris_module,
    lycoris_output,
    make_case,
    ours_output,
    randomize,
)

SD15_WIDTHS = (320, 640, 960, 1280, 1920, 2560, 768, 3072)


@pytest.mark.parametrize("factor", [-1, 1, 4, 7, 8, 16, 10_000])
def test_factorization_equals_lycoris_for_sd15_widths(factor):
    for width in SD15_WIDTHS + (4, 127, 360):
        assert factorization(width, factor) == lycoris_factorization(width, factor), width


SD15_LAYERS = {
    "attn q 320": lambda: nn.Linear(320, 320, device="meta"),
    "attn2 k 768->640": lambda: nn.Linear(768, 640, device="meta"),
    "ff proj 1280->10240": lambda: nn.Linear(1280, 10240, device="meta"),
    "ff out 5120->1280": lambda: nn.Linear(5120, 1280, device="meta"),
    "te mlp 768->3072": lambda: nn.Linear(768, 3072, device="meta"),
    "proj_in 1x1 640": lambda: nn.Conv2d(640, 640, 1, device="meta"),
    "resnet 3x3 320": lambda: nn.Conv2d(320, 320, 3, padding=1, device="meta"),
    "resnet 3x3 1920->640": lambda: nn.Conv2d(1920, 640, 3, padding=1, device="meta"),
    "downsampler 3x3 1280": lambda: nn.Conv2d(1280, 1280, 3, stride=2, padding=1, device="meta"),
}
LAYOUT_OPTIONS = [
    dict(rank=16),
    dict(rank=4, factor=8),
    dict(rank=4, factor=16, both=True),
    dict(rank=4, factor=4, both=True),  # w1 (4, 4) too small to factorise, w2 is not
    dict(rank=64, factor=4),
    dict(rank=8, full=True),
    dict(rank=8, tucker=True),
]


@pytest.mark.parametrize("layer", SD15_LAYERS)
def test_file_tensor_shapes_equal_lycoris_for_sd15_layers(layer):
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    for opts in LAYOUT_OPTIONS:
        base = SD15_LAYERS[layer]()
        ours = LoKrModule(
            NAME,
            base,
            opts["rank"],
            1,
            tucker=opts.get("tucker", False),
            factor=opts.get("factor", -1),
            decompose_both=opts.get("both", False),
            full_matrix=opts.get("full", False),
        )
        theirs = LokrModule(
            NAME,
            base,
            lora_dim=opts["rank"],
            alpha=1,
            use_tucker=opts.get("tucker", False),
            decompose_both=opts.get("both", False),
            factor=opts.get("factor", -1),
            full_matrix=opts.get("full", False),
        )
        shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
        assert shapes == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}, opts
        assert ours.scale == theirs.scale, opts


@pytest.mark.parametrize("case", CASES)
def test_lycoris_gives_our_outputs_for_our_tensors(case):
    base, module, x = make_case(case)
    randomize(module)
    module.multiplier = 0.7
    tensors = {f"{NAME}.{k}": v.detach().clone() for k, v in module.state_dict().items()}
    if "tucker" in case:
        # lycoris 4.1.3's file loader takes Tucker's w2_a (r, b) width for the
        # rank and fails; its module built with the same options reads the tensors.
        theirs = lycoris_module(base, case, multiplier=0.7)
        theirs.load_state_dict({k.partition(".")[2]: v for k, v in tensors.items()})
    else:
        algo, params = get_module(tensors, NAME)
        theirs = make_module(algo, params, NAME, base)
        theirs.multiplier = 0.7
    with torch.no_grad():
        ours = ours_output(base, module, x)
    torch.testing.assert_close(lycoris_output(theirs, x), ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_a_lycoris_made_lokr_loads_into_ours_with_the_same_outputs(case):
    base, _, x = make_case(case)
    theirs = lycoris_module(base, case, multiplier=1.0)
    randomize(theirs)
    tensors = {k: v.clone() for k, v in theirs.state_dict().items()}
    ours = LoKrModule.from_tensors(NAME, base, tensors, Dropout())
    with torch.no_grad():
        torch.testing.assert_close(
            ours_output(base, ours, x), lycoris_output(theirs, x), rtol=1e-5, atol=1e-5
        )


def test_a_lycoris_unbalanced_lokr_loads_with_the_same_outputs():
    torch.manual_seed(0)
    base = nn.Linear(40, 48).requires_grad_(False)
    theirs = LokrModule(NAME, base, lora_dim=2, alpha=3, unbalanced_factorization=True)
    randomize(theirs)
    ours = LoKrModule.from_tensors(NAME, base, dict(theirs.state_dict()), Dropout())
    assert ours.layout.out_split == (8, 6)  # w1 takes the larger side of 48
    x = torch.randn(3, 40)
    with torch.no_grad():
        want = lycoris_output(theirs, x)
        torch.testing.assert_close(ours_output(base, ours, x), want, rtol=1e-5, atol=1e-5)
