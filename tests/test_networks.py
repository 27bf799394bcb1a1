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


# --- network.resume_from: the file decides -----------------------------------------
def resume_file(sd, tmp_path):
    from networks.export import export_network
    from networks.metadata import ExportInfo

    path = tmp_path / "old.safetensors"
    spec = NetworkSpec("locon", rank=4, alpha=2, conv_rank=3, conv_alpha=1, dora=True)
    network = AdapterNetwork.create(spec, sd.unet, sd.text_encoder)
    randomize(network)
    export_network(network, path, ExportInfo(), "fp32")
    return path, network.state_dict()


def test_resume_from_takes_the_algorithm_ranks_and_options_from_the_file(sd, tmp_path):
    from trainer.config import load_config
    from trainer.train_setup import build_network

    path, saved = resume_file(sd, tmp_path)
    config = load_config(None, [f"network.resume_from={path}", "network.rank=4"])
    network = build_network(config, sd)
    spec = network.spec
    assert (spec.algorithm, spec.rank, spec.alpha, spec.conv_rank, spec.conv_alpha) == (
        "locon", 4, 2.0, 3, 1.0)
    assert spec.dora and not spec.dora_on_output and not spec.tucker
    assert spec.dropout == config.network.to_spec().dropout  # training settings stay the config's
    for key, tensor in network.state_dict().items():
        assert torch.equal(tensor, saved[key]), key
    network.detach()


@pytest.mark.parametrize("setting, mine, theirs", [
    ("network.rank=8", "network.rank = 8", "rank = 4"),
    ("network.type=loha", 'network.type = "loha"', 'type = "locon"'),
    ("network.conv_alpha=2", "network.conv_alpha = 2", "conv_alpha = 1"),
])  # fmt: skip
def test_resume_from_refuses_a_config_that_contradicts_the_file(
    setting, mine, theirs, sd, tmp_path
):
    from core.errors import UserError
    from trainer.config import load_config
    from trainer.train_setup import build_network

    path, _ = resume_file(sd, tmp_path)
    config = load_config(None, [f"network.resume_from={path}", setting])
    with pytest.raises(UserError) as raised:
        build_network(config, sd)
    message = str(raised.value)
    assert message.startswith(f"{mine} contradicts network.resume_from = \"{path}\", "
                              f"which holds {theirs}.")
