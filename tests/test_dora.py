"""DoRA (Liu et al. 2024, arXiv:2402.09353) against the other implementations:
PEFT's `use_dora` (its per-output-channel magnitude), an independent formula
for the input axis, and lycoris-lora's files in both directions; then the
file's metadata, `inspect`, the merge path of previews and `python -m trainer
sample`, and a short training run."""

from __future__ import annotations

import copy
import json

import pytest
import safetensors
import torch
from lycoris.kohya import LycorisNetworkKohya, create_network, create_network_from_weights
from lycoris.modules.locon import LoConModule
from peft import LoraConfig, get_peft_model
from torch import nn

from networks.base import Dropout
from networks.export import export_network, load_network
from networks.inspect import format_report, inspect_file
from networks.lora import LoRAModule
from networks.metadata import ExportInfo
from networks.network import AdapterNetwork, NetworkSpec
from tests.sd_fixtures import assert_outputs_close, fixed_inputs, run
from tests.test_kohya_file import TextModelShim
from trainer.merge import merge_adapters

DORA_LORA = NetworkSpec("lora", rank=4, alpha=2, dora=True)
DORA_LORA_OUT = NetworkSpec("lora", rank=4, alpha=2, dora=True, dora_on_output=True)


@pytest.fixture
def sd(demo_sd):
    return copy.deepcopy(demo_sd)


@pytest.fixture(scope="module")
def inputs(demo_sd):
    return fixed_inputs(demo_sd)


@torch.no_grad()
def randomize(parameters, seed: int = 1) -> None:
    """Non-zero factors and a magnitude away from the base norm."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in parameters:
        noise = torch.randn(param.shape, generator=generator)
        is_magnitude = name.endswith(("dora_scale", "magnitude_vector.default.weight"))
        param.copy_(param * (1 + 0.2 * noise) if is_magnitude else 0.1 * noise)


def dora_network(sd, spec: NetworkSpec) -> AdapterNetwork:
    network = AdapterNetwork.create(spec, sd.unet, sd.text_encoder).attach()
    randomize(network.named_parameters())
    return network


# --- PEFT and the independent formula, on plain Linear layers -----------------
class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(12, 10), nn.Linear(10, 6)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_peft_use_dora_gives_our_output_axis_outputs_and_gradients():
    peft_model = get_peft_model(TwoLinears(), LoraConfig(
        r=3, lora_alpha=2, target_modules=["a", "b"], use_dora=True, init_lora_weights=False))
    randomize((n, p) for n, p in peft_model.named_parameters() if "lora_" in n)
    ours_model = TwoLinears()
    adapters = []
    for name in ("a", "b"):
        layer = getattr(peft_model.base_model.model, name)
        module = LoRAModule(f"lora_unet_{name}", getattr(ours_model, name), 3, 2.0, Dropout())
        module.enable_dora(on_output=True)
        with torch.no_grad():
            module.lora_down.weight.copy_(layer.lora_A["default"].weight)
            module.lora_up.weight.copy_(layer.lora_B["default"].weight)
            magnitude = layer.lora_magnitude_vector["default"].weight
            module.dora_scale.copy_(magnitude.reshape(-1, 1))
        module.attach()
        adapters.append((module, layer))
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(2))
    theirs, ours = peft_model(x), ours_model(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    # Both detach the norm (DoRA paper, section 4.3): the gradients agree too.
    theirs.square().sum().backward()
    ours.square().sum().backward()
    for module, layer in adapters:
        torch.testing.assert_close(module.lora_up.weight.grad,
                                   layer.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(module.dora_scale.grad.flatten(),
                                   layer.lora_magnitude_vector["default"].weight.grad,
                                   rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_input_axis_outputs_and_gradients_follow_the_formula(kind):
    torch.manual_seed(0)
    layer = nn.Linear(12, 10) if kind == "linear" else nn.Conv2d(6, 5, 3, padding=1)
    module = LoRAModule("lora_unet_x", layer, 3, 2.0, Dropout())
    module.enable_dora(on_output=False)
    randomize(module.named_parameters())
    module.attach()
    x = torch.randn((2, 7, 12) if kind == "linear" else (2, 6, 8, 8),
                    generator=torch.Generator().manual_seed(4))
    ours = layer(x)
    # W' = W + s * up @ down; one norm per input column (over outputs and kernel).
    up, down = module.lora_up.weight, module.lora_down.weight
    delta = (up.flatten(1) @ down.flatten(1)).reshape(layer.weight.shape)
    merged = layer.weight + 2.0 / 3 * delta
    dims = [d for d in range(merged.dim()) if d != 1]
    norm = merged.pow(2).sum(dims, keepdim=True).sqrt().detach()
    weight = merged * module.dora_scale / norm
    op = nn.functional.linear if isinstance(layer, nn.Linear) else (
        lambda i, w, b: nn.functional.conv2d(i, w, b, padding=1))
    expected = op(x, weight, layer.bias)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(ours.square().sum(), [up, module.dora_scale])
    wanted = torch.autograd.grad(expected.square().sum(), [up, module.dora_scale])
    for got, want in zip(grads, wanted, strict=True):
        # Sums over every output position in another order: fp32 rounding
        # relative to the gradient's size, not to each element.
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


# --- files: ours in lycoris, lycoris' in ours ---------------------------------
def lycoris_layers_follow_the_file_axis(monkeypatch):
    """lycoris 4.1.3 builds every file module with its default output-axis
    magnitude (wd_on_output=True) and fails to copy an input-axis dora_scale
    into it; build it with the axis the file's tensor has, as wd_on_output=False."""
    original = LoConModule.make_module_from_state_dict.__func__

    def make(cls, lora_name, orig_module, up, down, mid, alpha, dora_scale):
        if dora_scale is None or dora_scale.shape[0] != 1:
            return original(cls, lora_name, orig_module, up, down, mid, alpha, dora_scale)
        module = cls(lora_name, orig_module, 1, down.size(0), float(alpha),
                     use_tucker=mid is not None, weight_decompose=True, wd_on_out=False)
        for target, source in ((module.lora_up.weight, up), (module.lora_down.weight, down),
                               (module.dora_scale, dora_scale)):
            target.data.copy_(source)
        return module

    monkeypatch.setattr(LoConModule, "make_module_from_state_dict", classmethod(make))


@pytest.mark.parametrize("spec", [DORA_LORA, DORA_LORA_OUT], ids=["input-axis", "output-axis"])
def test_lycoris_loads_our_dora_lora_file_with_the_same_outputs(
    spec, sd, inputs, tmp_path, monkeypatch
):
    monkeypatch.setattr(LycorisNetworkKohya, "UNET_TARGET_REPLACE_NAME", [])
    lycoris_layers_follow_the_file_axis(monkeypatch)
    path = tmp_path / "dora.safetensors"
    network = dora_network(sd, spec)
    export_network(network, path, ExportInfo(), "fp32")
    expected = run(sd.text_encoder, sd.unet, inputs)
    network.detach()

    shim = TextModelShim(sd.text_encoder)
    lycoris_net, weights = create_network_from_weights(1.0, str(path), None, shim, sd.unet)
    assert len(lycoris_net.unet_loras) == len(network.unet_adapters)
    lycoris_net.apply_to(shim, sd.unet, apply_text_encoder=True, apply_unet=True)
    lycoris_net.load_state_dict(weights, strict=False)
    assert_outputs_close(run(sd.text_encoder, sd.unet, inputs), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("wd_on_output", [False, True])
def test_a_dora_lora_file_lycoris_writes_loads_in_ours_with_the_same_outputs(
    wd_on_output, sd, inputs, tmp_path, monkeypatch
):
    # A preset is applied to lycoris' class attributes: put them back afterwards.
    for name in ("ENABLE_CONV", "UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME",
                 "TEXT_ENCODER_TARGET_REPLACE_MODULE", "TEXT_ENCODER_TARGET_REPLACE_NAME",
                 "MODULE_ALGO_MAP", "NAME_ALGO_MAP", "USE_FNMATCH", "TARGET_EXCLUDE_NAME"):
        if hasattr(LycorisNetworkKohya, name):
            monkeypatch.setattr(LycorisNetworkKohya, name, getattr(LycorisNetworkKohya, name))
    shim = TextModelShim(sd.text_encoder)
    lycoris_net = create_network(1.0, 4, 2, None, shim, sd.unet, algo="lora", dora_wd=True,
                                 wd_on_output=wd_on_output, preset="attn-mlp")
    lycoris_net.apply_to(shim, sd.unet, apply_text_encoder=True, apply_unet=True)
    randomize(lycoris_net.named_parameters())
    expected = run(sd.text_encoder, sd.unet, inputs)
    path = tmp_path / "lycoris-dora.safetensors"
    lycoris_net.save_weights(str(path), torch.float32, {"ss_network_args": json.dumps(
        {"algo": "lora", "dora_wd": "True", "wd_on_output": str(wd_on_output)})})
    lycoris_net.restore()

    clean = copy.deepcopy(sd)
    ours = load_network(path, clean.unet, clean.text_encoder).attach()
    assert ours.spec.dora and ours.spec.dora_on_output == wd_on_output
    assert_outputs_close(run(clean.text_encoder, clean.unet, inputs), expected,
                         rtol=1e-5, atol=1e-5)
    report = inspect_file(str(path))
    assert report.dora == {"output" if wd_on_output else "input": len(ours.adapters)}


# --- our files: metadata, inspect, reload, merge ------------------------------
@pytest.mark.parametrize("spec, axis", [(DORA_LORA, "input"), (DORA_LORA_OUT, "output")])
def test_our_dora_file_says_so_and_reloads_exactly(spec, axis, sd, inputs, tmp_path):
    path = tmp_path / "dora.safetensors"
    network = dora_network(sd, spec)
    export_network(network, path, ExportInfo(), "fp32")
    expected = run(sd.text_encoder, sd.unet, inputs)
    network.detach()
    with safetensors.safe_open(str(path), "pt") as f:
        metadata = f.metadata()
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if "dora_scale" in k}
    assert json.loads(metadata["ss_network_args"]) == {
        "algo": "lora", "dora_wd": "True", "wd_on_output": str(axis == "output")}
    assert metadata["ss_network_module"] == "lycoris.kohya"
    to_q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.dora_scale"
    width = sd.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.in_features
    assert shapes[to_q] == ((1, width) if axis == "input" else (width, 1))

    reloaded = load_network(path, sd.unet, sd.text_encoder).attach()
    assert (reloaded.spec.dora, reloaded.spec.dora_on_output) == (True, axis == "output")
    assert_outputs_close(run(sd.text_encoder, sd.unet, inputs), expected, rtol=0, atol=0)
    report = inspect_file(str(path))
    assert report.dora == {axis: len(network.adapters)}
    assert f"DoRA: {axis} axis x{len(network.adapters)}" in format_report(report)
    assert any("A1111 applies it wrongly" in w for w in report.warnings) == (axis == "output")


def test_sample_merge_of_a_dora_file_is_the_hooked_forward_at_its_weight(sd, inputs, tmp_path):
    path = tmp_path / "dora.safetensors"
    network = dora_network(sd, NetworkSpec("locon", rank=4, alpha=2, conv_rank=4,
                                           conv_alpha=1, dora=True))
    export_network(network, path, ExportInfo(), "fp32")
    network.set_multiplier(0.7)
    expected = run(sd.text_encoder, sd.unet, inputs)
    network.detach()
    base = run(sd.text_encoder, sd.unet, inputs)

    merge_adapters(sd, [(path, 0.7)])
    merged = run(sd.text_encoder, sd.unet, inputs)
    assert (merged.noise - base.noise).abs().max() > 1e-3
    assert_outputs_close(merged, expected, rtol=1e-4, atol=1e-5)


def test_a_dora_scale_that_fits_no_axis_is_refused_naming_the_module(sd, tmp_path):
    from core.errors import UserError

    path = tmp_path / "dora.safetensors"
    network = dora_network(sd, DORA_LORA)
    name = network.adapters[0].lora_name
    with torch.no_grad():
        network.adapters[0].dora_scale.data = torch.ones(1, 3)
    export_network(network, path, ExportInfo(), "fp32")
    network.detach()
    with pytest.raises(UserError, match=f"{name}: dora_scale has shape \\(1, 3\\)"):
        load_network(path, sd.unet, sd.text_encoder)


# --- training -----------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_images(tmp_path_factory):
    from trainer.demo_assets import write_demo_dataset

    root = tmp_path_factory.mktemp("data") / "all"
    write_demo_dataset(root, size=64)
    return root


def test_training_locon_with_dora_learns_the_magnitude_and_exports_it(
    demo_model_dir, demo_images, tmp_path, capsys
):
    from tests.test_train import config_for
    from trainer.train import run as train

    config = config_for(demo_model_dir, demo_images, tmp_path, **{
        "train.steps": 3, "network.type": "locon", "network.dora": True,
        "network.dora_on_output": True})
    result = train(config)
    assert len(result.losses) == 3 and all(0 < loss < 10 for loss in result.losses)
    assert "A1111 applies such files wrongly" in capsys.readouterr().err
    path = tmp_path / "test.safetensors"
    sd = load_network(path, *_fresh_unet_and_text_encoder(demo_model_dir))
    assert sd.spec.dora and sd.spec.dora_on_output and sd.spec.algorithm == "locon"
    moved = [a for a in sd.adapters if not torch.allclose(
        a.dora_scale, a.base.weight.flatten(1).norm(dim=1, keepdim=True), rtol=1e-6)]
    assert moved, "the magnitudes did not train"


def _fresh_unet_and_text_encoder(demo_model_dir):
    from trainer.model_loading import load_sd_model

    sd = load_sd_model(demo_model_dir / "diffusers")
    return sd.unet, sd.text_encoder
