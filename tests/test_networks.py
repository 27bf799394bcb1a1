"""Adapter modules: identity at init, adapter == merged, unmerge/detach restore,
multiplier, enable/disable and dropout, for every algorithm."""

from __future__ import annotations

import copy

import pytest
import torch

from networks.base import Dropout
from networks.network import AdapterNetwork, NetworkSpec
from tests.sd_fixtures import NETWORK_CASES, assert_outputs_close, fixed_inputs, randomize, run


@pytest.fixture(scope="module")
def base_sd(demo_sd):
    return demo_sd


@pytest.fixture
def sd(base_sd):
    """A private copy: a failing test must not leave hooks on the shared model."""
    return copy.deepcopy(base_sd)


@pytest.fixture(scope="module")
def inputs(base_sd):
    return fixed_inputs(base_sd)


@pytest.fixture(scope="module")
def base_outputs(base_sd, inputs):
    return run(base_sd.text_encoder, base_sd.unet, inputs)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("case", NETWORK_CASES)
def test_fresh_network_changes_no_output(case, sd, inputs, base_outputs):
    AdapterNetwork.create(NETWORK_CASES[case], sd.unet, sd.text_encoder).attach()
    out = run(sd.text_encoder, sd.unet, inputs)
    assert torch.equal(out.text, base_outputs.text)
    assert torch.equal(out.noise, base_outputs.noise)


@pytest.mark.parametrize("case", NETWORK_CASES)
def test_adapter_forward_equals_merged_and_unmerge_restores(case, sd, inputs, base_outputs):
    before = weights(sd.unet), weights(sd.text_encoder)
    network = AdapterNetwork.create(NETWORK_CASES[case], sd.unet, sd.text_encoder).attach()
    randomize(network)
    adapted = run(sd.text_encoder, sd.unet, inputs)
    assert (adapted.noise - base_outputs.noise).abs().max() > 1e-4, "the adapter must do something"

    network.merge()
    assert_outputs_close(run(sd.text_encoder, sd.unet, inputs), adapted)

    network.unmerge()
    for model, original in zip((sd.unet, sd.text_encoder), before, strict=True):
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, original[name]), name
    assert_outputs_close(run(sd.text_encoder, sd.unet, inputs), adapted)

    network.detach()
    after = run(sd.text_encoder, sd.unet, inputs)
    assert torch.equal(after.noise, base_outputs.noise)


def test_targets_cover_the_conv_set_only_for_conv_algorithms(sd):
    lora = AdapterNetwork.create(NETWORK_CASES["lora"], sd.unet, sd.text_encoder)
    locon = AdapterNetwork.create(NETWORK_CASES["locon"], sd.unet, sd.text_encoder)
    assert (len(lora.unet_adapters), len(lora.text_encoder_adapters)) == (192, 72)
    conv_only = {a.lora_name for a in locon.unet_adapters} - {
        a.lora_name for a in lora.unet_adapters
    }
    assert conv_only and all(
        name.endswith(("conv1", "conv2", "conv_shortcut", "time_emb_proj", "_conv"))
        for name in conv_only
    )


def test_multiplier_scales_the_delta_and_disable_removes_it(sd, inputs, base_outputs):
    network = AdapterNetwork.create(NETWORK_CASES["lora"], sd.unet, None).attach()
    randomize(network)
    layer = next(a.base for a in network.unet_adapters if isinstance(a.base, torch.nn.Linear))
    x = torch.randn(3, layer.in_features)
    network.set_enabled(False)
    base_y = layer(x)
    network.set_enabled(True)
    delta_1 = layer(x) - base_y
    network.set_multiplier(2.0)
    torch.testing.assert_close(layer(x) - base_y, 2 * delta_1, rtol=1e-5, atol=1e-6)
    network.set_multiplier(0.0)
    assert torch.equal(layer(x), base_y)
    network.set_multiplier(1.0)
    network.set_enabled(False)
    assert torch.equal(run(sd.text_encoder, sd.unet, inputs).noise, base_outputs.noise)


@pytest.mark.parametrize("case", ["lora", "loha"])
def test_dropout_acts_in_training_only(case, sd, inputs, base_outputs):
    spec = NETWORK_CASES[case]
    dropped = NetworkSpec(**{**spec.__dict__, "dropout": Dropout(module=1.0)})
    network = AdapterNetwork.create(dropped, sd.unet, sd.text_encoder).attach()
    randomize(network)
    network.train()
    assert torch.equal(run(sd.text_encoder, sd.unet, inputs).noise, base_outputs.noise)
    network.eval()
    assert not torch.equal(run(sd.text_encoder, sd.unet, inputs).noise, base_outputs.noise)

    noisy = NetworkSpec(**{**spec.__dict__, "dropout": Dropout(neuron=0.5, rank=0.5)})
    network.detach()
    network = AdapterNetwork.create(noisy, sd.unet, sd.text_encoder).attach()
    randomize(network)
    network.train()
    torch.manual_seed(0)
    first = run(sd.text_encoder, sd.unet, inputs).noise
    second = run(sd.text_encoder, sd.unet, inputs).noise
    assert not torch.equal(first, second), "dropout must vary between steps in training"
    network.eval()
    once, again = (run(sd.text_encoder, sd.unet, inputs).noise for _ in range(2))
    assert torch.equal(once, again)


def test_merge_refuses_non_finite_delta(sd):
    network = AdapterNetwork.create(NETWORK_CASES["lora"], sd.unet, None).attach()
    randomize(network)
    with torch.no_grad():
        network.unet_adapters[0].lora_up.weight[0, 0] = float("nan")
    before = network.unet_adapters[0].base.weight.clone()
    with pytest.raises(ValueError, match="NaN"):
        network.merge()
    assert torch.equal(network.unet_adapters[0].base.weight, before)


def test_gradients_flow_only_to_adapters(sd, inputs):
    for model in (sd.unet, sd.text_encoder):
        model.requires_grad_(False)
    network = AdapterNetwork.create(NETWORK_CASES["loha"], sd.unet, sd.text_encoder).attach()
    randomize(network)
    text = sd.text_encoder(inputs["ids"]).last_hidden_state
    sd.unet(inputs["latents"], inputs["timesteps"], text).sample.square().mean().backward()
    grads = [p.grad for p in network.parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
