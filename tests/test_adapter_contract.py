"""The adapter contract, one table of cases: every algorithm and option, built
through the registry on a Linear and on a 3x3 conv, must change nothing when
fresh, agree between its training forward and its merged weight, unmerge
exactly, vanish at multiplier 0, and merge to the closed-form weight written
out independently below (Hu et al. 2021; LyCORIS arXiv:2309.14859; DoRA, Liu
et al. 2024, arXiv:2402.09353)."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from networks.algorithms import ALGORITHMS
from networks.base import Dropout
from networks.network import NetworkSpec
from networks.registry import module_class

# name -> (algorithm, layer, options); DoRA on either axis joins every algorithm.
BASE_CASES = {
    "lora-linear": ("lora", "linear", {}),
    "lora-conv1x1": ("lora", "conv1x1", {}),
    "locon-conv": ("locon", "conv", {}),
    "locon-tucker-conv": ("locon", "conv", {"tucker": True}),
    "loha-linear": ("loha", "linear", {}),
    "loha-conv": ("loha", "conv", {}),
    "loha-tucker-conv": ("loha", "conv", {"tucker": True}),
    # LoKr on layers wide enough to split: 48 = 6 x 8, 64 = 8 x 8, so rank 3 makes
    # w2 (and with decompose_both w1) low-rank; the 6 -> 5 conv gets whole factors.
    "lokr-linear": ("lokr", "wide-linear", {}),
    "lokr-decompose-both-linear": ("lokr", "wide-linear", {"decompose_both": True}),
    "lokr-factor-linear": ("lokr", "wide-linear", {"factor": 4}),
    "lokr-full-linear": ("lokr", "wide-linear", {"full_matrix": True}),
    "lokr-conv": ("lokr", "wide-conv", {}),
    "lokr-whole-conv": ("lokr", "conv", {}),
    "lokr-tucker-conv": ("lokr", "wide-conv", {"tucker": True}),
}
CASES = {
    **BASE_CASES,
    **{f"{n}-dora": (a, layer, {**o, "dora": True}) for n, (a, layer, o) in BASE_CASES.items()},
    **{f"{n}-dora-out": (a, layer, {**o, "dora": True, "dora_on_output": True})
       for n, (a, layer, o) in BASE_CASES.items() if "tucker" not in n},
}  # fmt: skip


# kind -> (layer, input shape)
LAYERS = {
    "linear": (lambda: nn.Linear(12, 10), (2, 7, 12)),
    "conv1x1": (lambda: nn.Conv2d(6, 5, 1), (2, 6, 9, 9)),
    "conv": (lambda: nn.Conv2d(6, 5, 3, padding=1, stride=2), (2, 6, 9, 9)),
    "wide-linear": (lambda: nn.Linear(64, 48), (2, 5, 64)),
    "wide-conv": (lambda: nn.Conv2d(64, 48, 3, padding=1, stride=2), (2, 64, 7, 7)),
}


def make_layer(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return LAYERS[kind][0]()


def make_input(kind: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    return torch.randn(LAYERS[kind][1], generator=generator)


def build(case: str):
    """The case's module, through the registry as a network builds it."""
    algorithm, kind, options = CASES[case]
    shared = ("tucker", "dora", "dora_on_output")
    spec = NetworkSpec(algorithm, rank=3, alpha=2.0, conv_rank=3, conv_alpha=2.0,
                       tucker=options.get("tucker", False), dora=options.get("dora", False),
                       dora_on_output=options.get("dora_on_output", False),
                       options={k: v for k, v in options.items() if k not in shared})  # fmt: skip
    layer = make_layer(kind)
    module = module_class(algorithm)("lora_unet_x", layer, 3, 2.0, Dropout(),
                                     **spec.module_kwargs())  # fmt: skip
    if spec.dora:
        module.enable_dora(spec.dora_on_output)
    module.attach()
    return module, layer


@torch.no_grad()
def randomize(module) -> None:
    generator = torch.Generator().manual_seed(1)
    for name, param in module.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        # A magnitude near the base norm, as after some training.
        param.copy_(param * (1 + 0.2 * noise) if name == "dora_scale" else 0.3 * noise)


# --- the closed forms, written out independently of networks/ --------------
def closed_form_delta(module) -> torch.Tensor:
    p = dict(module.named_parameters())
    if "lora_up.weight" in p:
        up, down = p["lora_up.weight"], p["lora_down.weight"]
        if "lora_mid.weight" in p:
            return torch.einsum("or,rshw,si->oihw", up[:, :, 0, 0], p["lora_mid.weight"],
                                down[:, :, 0, 0])
        if down.dim() == 2:
            return up @ down
        return torch.einsum("or,rihw->oihw", up[:, :, 0, 0], down)
    w = module.base.weight
    if "lokr_w1" in p or "lokr_w1_a" in p:
        return kronecker_delta(p, w.shape)
    if "hada_t1" in p:
        factors = [torch.einsum("ijhw,io,jn->onhw", p[f"hada_t{i}"], p[f"hada_w{i}_a"],
                                p[f"hada_w{i}_b"]) for i in (1, 2)]
        return factors[0] * factors[1]
    return ((p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])).reshape(w.shape)


def kronecker_delta(p: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """delta[i*b + j, k*d + l] = w1[i, k] * w2[j, l] (a conv's kernel rides on w2)."""
    w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
    (a, c), kernel = w1.shape, tuple(shape[2:])
    b, d = shape[0] // a, shape[1] // c
    if "lokr_w2" in p:
        w2 = p["lokr_w2"]
    elif "lokr_t2" in p:  # core (r, r, k, k), w2_a (r, b), w2_b (r, d)
        w2 = torch.einsum("rshw,rb,sd->bdhw", p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
    else:
        w2 = p["lokr_w2_a"] @ p["lokr_w2_b"]
    w2 = w2.reshape(b, d, *kernel)
    if kernel:
        return torch.einsum("ik,jlhw->ijklhw", w1, w2).reshape(shape)
    return torch.einsum("ik,jl->ijkl", w1, w2).reshape(shape)


def closed_form_scale(module) -> float:
    """alpha / rank; LoKr's rank is the rows of w2_b (else w1_b), and whole
    factors have none: scale 1 whatever the alpha."""
    p = dict(module.named_parameters())
    if "lokr_w1" in p or "lokr_w1_a" in p:
        rank_of = next((p[k].shape[0] for k in ("lokr_w2_b", "lokr_w1_b") if k in p), None)
        return 1.0 if rank_of is None else float(module.alpha) / rank_of
    return float(module.alpha) / module.rank


def closed_form_weight(module, multiplier: float) -> torch.Tensor:
    w = module.base.weight.detach()
    scale = closed_form_scale(module)
    delta = closed_form_delta(module).detach()
    if "dora_scale" not in dict(module.named_parameters()):
        return w + multiplier * scale * delta
    merged = w + scale * delta
    dims = tuple(d for d in range(merged.dim()) if d != (0 if module.dora_on_output else 1))
    norm = merged.pow(2).sum(dim=dims, keepdim=True).sqrt()
    dora = merged * module.dora_scale.detach() / norm
    return w + multiplier * (dora - w)


# --- the table ----------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_a_fresh_module_changes_no_output(case):
    module, layer = build(case)
    x = make_input(CASES[case][1])
    with torch.no_grad():
        adapted = layer(x)
        module.detach()
        base = layer(x)
    if module.dora:  # m / (||W|| + eps): equal up to the eps that guards a zero norm
        torch.testing.assert_close(adapted, base, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(adapted, base)


@pytest.mark.parametrize("multiplier", [1.0, 0.6])
@pytest.mark.parametrize("case", CASES)
def test_the_training_forward_equals_the_merged_forward(case, multiplier):
    module, layer = build(case)
    randomize(module)
    module.multiplier = multiplier
    x = make_input(CASES[case][1])
    with torch.no_grad():
        adapted = layer(x)
        module.enabled = False
        base = layer(x)
        module.enabled = True
        module.merge()
        merged = layer(x)
    assert (adapted - base).abs().max() > 1e-2  # the case has something to agree on
    torch.testing.assert_close(adapted, merged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_unmerge_restores_the_base_weight_exactly(case):
    module, layer = build(case)
    randomize(module)
    before = layer.weight.detach().clone()
    module.merge()
    assert not torch.equal(layer.weight, before)
    module.unmerge()
    assert torch.equal(layer.weight, before)


@pytest.mark.parametrize("case", CASES)
def test_multiplier_zero_is_the_base_layer(case):
    module, layer = build(case)
    randomize(module)
    x = make_input(CASES[case][1])
    with torch.no_grad():
        module.multiplier = 0.0
        off = layer(x)
        module.detach()
        assert torch.equal(off, layer(x))


@pytest.mark.parametrize("multiplier", [1.0, 0.6])
@pytest.mark.parametrize("case", CASES)
def test_the_merged_weight_is_the_closed_form(case, multiplier):
    module, layer = build(case)
    randomize(module)
    module.multiplier = multiplier
    expected = closed_form_weight(module, multiplier)
    torch.testing.assert_close(module.merged_weight(layer.weight.detach()), expected,
                               rtol=1e-5, atol=1e-6)
    module.merge()
    torch.testing.assert_close(layer.weight.detach(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_the_kohya_file_round_trip_rebuilds_the_same_module(case, tmp_path):
    from networks.kohya_file import read_network_file, save_network_file
    from networks.network import AdapterNetwork

    module, layer = build(case)
    randomize(module)
    x = make_input(CASES[case][1])
    with torch.no_grad():
        expected = layer(x)
    module.detach()
    path = tmp_path / "adapter.safetensors"
    save_network_file(path, {f"lora_unet_x.{k}": v for k, v in module.state_dict().items()},
                      {}, "fp32")
    model = nn.Module()
    model.x = layer  # kohya name lora_unet_x
    tensors, _ = read_network_file(path)
    reloaded = AdapterNetwork.from_state_dict(tensors, model, None).attach()
    (again,) = reloaded.adapters
    assert type(again) is type(module) and again.rank == module.rank
    assert again.file_options() == module.file_options()
    with torch.no_grad():
        assert torch.equal(layer(x), expected)


def test_the_table_covers_every_registered_algorithm_and_option():
    covered = {(a, name) for a, _, options in CASES.values() for name in options}
    for algorithm in ALGORITHMS.values():
        assert algorithm.name in {a for a, _, _ in CASES.values()}
        for option in algorithm.option_names:
            assert (algorithm.name, option) in covered, (algorithm.name, option)


@pytest.mark.parametrize("case", CASES)
def test_a_module_is_recognised_from_the_keys_it_writes(case):
    from networks.algorithms import file_algorithm
    from networks.registry import module_class_for_keys

    module, _ = build(case)
    suffixes = set(module.state_dict())
    algorithm = ALGORITHMS[CASES[case][0]]
    assert file_algorithm(suffixes).name == (algorithm.file_name or algorithm.name)
    assert module_class_for_keys(suffixes) is type(module)
    assert ("dora_scale" in suffixes) == module.dora


def test_the_registry_imports_without_torch():
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys, networks.algorithms; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


# --- the config schema reads the registry ----------------------------------------
def test_every_option_is_a_network_setting_that_reaches_the_spec():
    from trainer.config import load_config

    config = load_config(None, ["network.type=loha", "network.tucker=true", "network.dora=true",
                                "network.dora_on_output=true"])
    spec = config.network.to_spec()
    assert (spec.tucker, spec.dora, spec.dora_on_output) == (True, True, True)
    assert spec.option_values() == {"tucker": True, "dora": True, "dora_on_output": True}


def test_lokr_options_are_network_settings_that_reach_the_module():
    from trainer.config import load_config

    config = load_config(None, ["network.type=lokr", "network.factor=4",
                                "network.decompose_both=true", "network.rank=3"])
    spec = config.network.to_spec()
    assert spec.option_values() == {"factor": 4, "decompose_both": True, "full_matrix": False,
                                    "tucker": False, "dora": False, "dora_on_output": False}
    module = module_class("lokr")("lora_unet_x", nn.Linear(64, 48), spec.rank, spec.alpha,
                                  spec.dropout, **spec.module_kwargs())  # fmt: skip
    # factor 4: 48 = 4 x 12 and 64 = 4 x 16; w1 (4, 4) is too small to factorise.
    assert module.layout.out_split == (4, 12) and module.layout.in_split == (4, 16)
    assert module.layout.w1_rank is None and module.layout.w2_rank == 3


@pytest.mark.parametrize("settings, message", [
    (["network.type=lora", "network.tucker=true"],
     'network.tucker = true does not apply to network.type = "lora" (only to locon, loha, '
     'lokr); remove it or change network.type'),
    (["network.type=locon", "network.factor=8"],
     'network.factor = 8 does not apply to network.type = "locon" (only to lokr)'),
    (["network.type=lokr", "network.factor=0"],
     "network.factor = 0 must be -1 (automatic) or a whole number of at least 1"),
    (["network.type=lokr", "network.factor=-2"],
     "network.factor = -2 must be -1 (automatic) or a whole number of at least 1"),
    (["network.dora_on_output=true"],
     "network.dora_on_output = true needs network.dora = true; set both, or remove "
     "network.dora_on_output"),
])  # fmt: skip
def test_an_option_that_does_not_fit_is_refused(settings, message):
    from core.errors import UserError
    from trainer.config import load_config

    with pytest.raises(UserError, match=re.escape(message)):
        load_config(None, settings)
