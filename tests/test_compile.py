"""train.compile: the compiled U-Net with its adapters trains, resumes and
exports as the eager one does, across bucket shapes, multipliers and
enable/disable, and Dynamo captures the U-Net forward as one graph.

Inductor's C++ kernel build takes minutes per shape on this CPU, so these
tests compile with "aot_eager": the same Dynamo graph (hooks included) and
AOTAutograd joint forward/backward graph Inductor receives, run with eager
kernels. Inductor itself is measured in bench/train_step.py (BENCHMARKS.md).
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from networks.base import Dropout
from networks.network import AdapterNetwork, NetworkSpec
from tests.test_train import config_for, four_images, metrics  # noqa: F401
from trainer import compile as compile_module
from trainer.train import run

# aot_eager decomposes some ops (e.g. group norm), changing float sums' order.
LOSS_TOLERANCE = dict(rtol=1e-4, atol=1e-6)
WEIGHT_TOLERANCE = dict(rtol=1e-3, atol=1e-6)


@pytest.fixture
def aot_eager_backend(monkeypatch):
    monkeypatch.setattr(compile_module, "BACKEND", "aot_eager")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_training_resumed_midway_follows_the_eager_run(
    demo_model_dir, four_images, tmp_path, aot_eager_backend, capsys  # noqa: F811
):
    # One bucket here (each shape costs a compile); the shapes test below
    # changes them under compile.
    settings = {"network.type": "locon", "network.conv_rank": 2, "train.steps": 6,
                "train.save_state_every_n_steps": 3}
    eager = run(config_for(demo_model_dir, four_images, tmp_path / "eager", **settings))
    compiled_config = config_for(demo_model_dir, four_images, tmp_path / "compiled",
                                 **settings, **{"train.compile": True})
    first = run(compiled_config, stop_at_step=3)
    assert "each of the 1 bucket size(s)" in capsys.readouterr().out
    second = run(compiled_config, resume=True)
    assert first.stopped_early and not second.stopped_early
    assert [m["step"] for m in metrics(tmp_path / "compiled")] == list(range(1, 7))
    torch.testing.assert_close(torch.tensor(first.losses + second.losses),
                               torch.tensor(eager.losses), **LOSS_TOLERANCE)
    # Adapters trained: the losses moved, and as eager's did.
    assert eager.losses[-1] != eager.losses[0]
    ours, theirs = load_file(second.final_file), load_file(eager.final_file)
    assert ours.keys() == theirs.keys()
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], **WEIGHT_TOLERANCE)
    assert any(t.abs().max() > 0 for k, t in theirs.items() if "lora_up" in k)


def small_unet():
    """Two blocks of the SD U-Net's kinds (cross-attention, resnets, up and
    down sampling): what the hooks meet, at a quarter of the demo's tracing time."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    ).eval()  # fmt: skip


def trained_looking(unet, spec: NetworkSpec):
    network = AdapterNetwork.create(spec, unet, None).attach()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in network.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return network


class CountingBackend:
    """Counts the graphs Dynamo hands over and runs them as captured."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, graph, example_inputs):
        self.graphs += 1
        return graph.forward


def inputs(side_h: int, side_w: int):
    generator = torch.Generator().manual_seed(side_h * 100 + side_w)
    latents = torch.randn(2, 4, side_h, side_w, generator=generator)
    text = torch.randn(2, 77, 32, generator=generator)  # both U-Nets' cross_attention_dim
    return latents, torch.tensor([10, 700]), text


def test_shapes_multiplier_and_switches_under_compile_match_eager():
    # LoCon with DoRA: multiplier 1 scales the layers' inputs in a pre-hook,
    # 0.5 blends in the forward hook; the plain paths are in the training test.
    unet = small_unet()
    eager = copy.deepcopy(unet)
    network = trained_looking(unet, NetworkSpec(
        algorithm="locon", rank=4, conv_rank=2, train_text_encoder=False, dora=True))
    network.eval()
    backend = CountingBackend()
    # One graph for the whole forward, hooks included: a break raises.
    compiled = compile_module.compile_unet(unet, network, backend=backend, fullgraph=True)
    cases = [((8, 8), 1.0, True), ((8, 8), 1.0, True), ((4, 16), 1.0, True),
             ((8, 8), 0.5, True), ((8, 8), 0.5, True), ((8, 8), 0.5, False),
             ((8, 8), 1.0, True)]
    outputs = {}
    with torch.no_grad():
        for (h, w), multiplier, enabled in cases:
            network.set_multiplier(multiplier)
            network.set_enabled(enabled)
            args = inputs(h, w)
            outputs[(h, w), multiplier, enabled] = out = compiled(*args).sample
            torch.testing.assert_close(out, unet(*args).sample, rtol=1e-5, atol=1e-6)
    # A graph per distinct (shape, multiplier, switch) and none for a repeat.
    assert backend.graphs == len(set(cases))
    # The adapters act on the compiled output, scaled by the multiplier; off is the base.
    on, half = outputs[(8, 8), 1.0, True], outputs[(8, 8), 0.5, True]
    off = outputs[(8, 8), 0.5, False]
    with torch.no_grad():
        torch.testing.assert_close(off, eager(*inputs(8, 8)).sample, rtol=1e-5, atol=1e-6)
    assert (on - off).abs().max() > 1e-3 and (half - off).abs().max() > 1e-3
    assert not torch.allclose(on, half)
    network.detach()


def test_the_training_forward_with_every_dropout_is_one_graph(demo_sd):
    spec = NetworkSpec(algorithm="lora", rank=4, train_text_encoder=False,
                       dropout=Dropout(neuron=0.1, rank=0.1, module=0.3))
    unet = copy.deepcopy(demo_sd.unet)
    network = trained_looking(unet, spec)
    network.train()
    unet.train()
    compile_module.prepare(network)
    explanation = torch._dynamo.explain(unet)(*inputs(8, 8))
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), [
        str(reason.reason)[:200] for reason in explanation.break_reasons]
    network.detach()
