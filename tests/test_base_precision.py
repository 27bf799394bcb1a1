"""`model.base_precision` (trainer/base_precision.py, trainer/quantized_weight.py):
an fp8 base stores float8 codes, stays close to the full-precision model,
trains adapters as well and exports files that act the same on the full
model; fp16/bf16/fp32 store those dtypes; nf4 and impossible combinations
are refused with the settings named."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from safetensors import safe_open
from torch import nn

from core.errors import UserError
from networks.network import AdapterNetwork, NetworkSpec
from tests.sd_fixtures import fixed_inputs, randomize
from tests.sd_fixtures import run as run_model
from tests.train_helpers import fixed_eval_loss, with_adapter
from trainer.base_precision import check_base_precision, quantized_weights, weight_bytes
from trainer.config import PRESETS_DIR, load_config
from trainer.quantized_weight import FP8, QuantizedWeight
from trainer.train_setup import load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")
# Measured on the demo model (seeds 0-2): the fp8 U-Net's output is 7.8-8.7 %
# (relative L2) from the fp32 one's, the bf16 U-Net's 1.2-1.3 %.
FP8_OUTPUT_TOLERANCE = 0.15


def config(model_dir, **overrides):
    values = {"model.path": str(model_dir / "diffusers"), "train.scheduler": "constant",
              "train.seed": 7, "output.save_precision": "fp32", **overrides}
    return load_config(PRESETS_DIR / "cpu-demo.toml",
                       [f"{key}={json.dumps(value)}" for key, value in values.items()])


@pytest.fixture(scope="module")
def full(demo_model_dir):
    return load_model(config(demo_model_dir), CPU)


@pytest.fixture(scope="module")
def fp8(demo_model_dir):
    return load_model(config(demo_model_dir, **{"model.base_precision": "fp8"}), CPU)


def layers(sd):
    return [m for part in (sd.unet, sd.text_encoder) for m in part.modules()
            if type(m) in (nn.Linear, nn.Conv2d)]


def test_fp8_stores_every_layer_weight_as_float8_in_a_quarter_of_the_memory(full, fp8):
    quantized = [m.weight for m in layers(fp8)]
    assert quantized and all(isinstance(w, QuantizedWeight) for w in quantized)
    assert {w.codes.dtype for w in quantized} == {FP8}
    assert {w.dtype for w in quantized} == {torch.float32}  # the compute dtype
    assert not any(w.requires_grad for w in quantized)
    # Biases, norms and embeddings stay in the compute dtype.
    rest = [p for part in (fp8.unet, fp8.text_encoder) for p in part.parameters()
            if not isinstance(p, QuantizedWeight)]
    assert rest and {p.dtype for p in rest} == {torch.float32}
    # The same state-dict names, so the layers stay the ones adapters target.
    assert set(fp8.unet.state_dict()) == set(full.unet.state_dict())
    fp32_bytes = sum(m.weight.numel() * 4 for m in layers(full))
    codes = sum(w.codes.numel() for w in quantized)
    stored = sum(w.stored_bytes() for w in quantized)
    assert codes * 4 == fp32_bytes  # one byte per weight
    assert 0.25 < stored / fp32_bytes < 0.27, stored / fp32_bytes  # + a scale per channel
    assert weight_bytes(fp8.unet) < 0.3 * weight_bytes(full.unet)


@pytest.mark.parametrize("seed", [0, 1])
def test_fp8_unet_output_stays_close_to_the_full_precision_one(full, fp8, seed):
    inputs = fixed_inputs(full, seed)
    expected = run_model(full.text_encoder, full.unet, inputs)
    with torch.no_grad():
        noise = fp8.unet(inputs["latents"], inputs["timesteps"], expected.text).sample
        with torch.autocast("cpu", dtype=torch.bfloat16):  # fp8 codes, bf16 compute
            bf16 = fp8.unet(inputs["latents"], inputs["timesteps"], expected.text).sample
    for output in (noise, bf16):
        error = float((output.float() - expected.noise).norm() / expected.noise.norm())
        assert torch.isfinite(output).all() and 0 < error < FP8_OUTPUT_TOLERANCE, error


def dequantized_copy(sd):
    """`sd` with every quantized weight replaced by its plain dequantized tensor."""
    plain = copy.deepcopy(sd)
    for module in layers(plain):
        module.weight = nn.Parameter(module.weight.dequantize(), requires_grad=False)
    assert not quantized_weights(plain.unet) and not quantized_weights(plain.text_encoder)
    return plain


SPECS = {
    "lora": NetworkSpec("lora", rank=4, alpha=2),  # with the text encoder
    "locon-dora": NetworkSpec("locon", rank=4, alpha=2, conv_rank=4, conv_alpha=1, dora=True,
                              train_text_encoder=False),
    "loha": NetworkSpec("loha", rank=4, alpha=2, conv_rank=4, conv_alpha=1,
                        train_text_encoder=False),
    "lokr": NetworkSpec("lokr", rank=2, alpha=2, conv_rank=2, conv_alpha=1,
                        options={"decompose_both": True}, train_text_encoder=False),
}


def adapter_gradients(sd, spec, state=None):
    network = AdapterNetwork.create(spec, sd.unet, sd.text_encoder)
    if state is None:
        randomize(network, std=0.05)  # lora_up starts at 0: no gradient for lora_down
    else:
        network.load_state_dict(state)
    network.attach()
    inputs = fixed_inputs(sd, 0)
    try:
        text = sd.text_encoder(inputs["ids"]).last_hidden_state
        out = sd.unet(inputs["latents"], inputs["timesteps"], text).sample
        out.square().mean().backward()
        return network.state_dict(), {n: p.grad for n, p in network.named_parameters()}
    finally:
        network.detach()


@pytest.mark.parametrize("case", sorted(SPECS))
def test_gradients_reach_the_adapters_through_fp8_layers_as_through_plain_ones(fp8, case):
    # The same (dequantized) weights as plain tensors: the quantized layers'
    # own backward must give the adapters the same gradients, DoRA's
    # magnitudes (read from base.weight) included. Measured: identical.
    state, grads = adapter_gradients(fp8, SPECS[case])
    _, expected = adapter_gradients(dequantized_copy(fp8), SPECS[case], state)
    assert grads.keys() == expected.keys() and grads
    if SPECS[case].dora:
        assert any(name.endswith("dora_scale") for name in grads)
    for name, grad in grads.items():
        assert grad is not None and torch.isfinite(grad).all(), name
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-7, msg=name)
    assert any(float(g.abs().max()) > 0 for g in grads.values())
    # Nothing flows into, or is allocated for, the frozen weights.
    frozen = [p for part in (fp8.unet, fp8.text_encoder) for p in part.parameters()]
    assert all(p.grad is None and not p.requires_grad for p in frozen)


def test_gradient_checkpointing_recomputes_the_fp8_layers_to_the_same_gradients(
    fp8, monkeypatch
):
    from trainer.quantized_weight import Fp8Codec

    upcasts = []
    original = Fp8Codec.dequantize
    monkeypatch.setattr(Fp8Codec, "dequantize",
                        lambda self, dtype: upcasts.append(1) or original(self, dtype))
    checkpointed = copy.deepcopy(fp8)
    checkpointed.unet.enable_gradient_checkpointing()
    checkpointed.text_encoder.gradient_checkpointing_enable()
    checkpointed.unet.train()
    checkpointed.text_encoder.train()
    state, grads = adapter_gradients(checkpointed, SPECS["lora"])
    recomputed = len(upcasts)
    upcasts.clear()
    _, expected = adapter_gradients(fp8, SPECS["lora"], state)
    assert recomputed > len(upcasts) > 0  # the forward upcasts ran again in backward
    assert any(n.startswith("lora_te") for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-7, msg=name)


def test_a_quantized_weight_refuses_to_be_merged_into(fp8):
    weight = layers(fp8)[0].weight
    with pytest.raises(RuntimeError, match="quantized frozen weight"), torch.no_grad():
        weight.copy_(torch.zeros(weight.shape))


@pytest.fixture(scope="module")
def trained(demo_model_dir, tmp_path_factory):
    """The same 10 steps on an fp32 base and an fp8 base, the fp8 run with a
    1-step preview at its end; the decoded latents are recorded."""
    from trainer import sampling
    from trainer.train import run

    latents = []
    decode = sampling.decode_image

    def recording(pipe, result):
        latents.append(result.detach().clone())
        return decode(pipe, result)

    out = tmp_path_factory.mktemp("trained")
    common = {"train.steps": 10, "train.unet_lr": 3e-3, "sample.steps": 1}
    results = {"auto": run(config(demo_model_dir, **common, **{
        "sample.every_n_steps": 0, "output.dir": str(out / "auto")}))}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sampling, "decode_image", recording)
        results["fp8"] = run(config(demo_model_dir, **common, **{
            "model.base_precision": "fp8", "sample.every_n_steps": 10,
            "output.dir": str(out / "fp8")}))
    return {**results, "latents": latents, "out": out}


def test_training_on_fp8_lowers_the_loss_as_on_fp32(full, trained):
    from trainer.demo_assets import ensure_demo_dataset

    data = ensure_demo_dataset()
    before = fixed_eval_loss(full, data)
    decrease = {}
    for name in ("auto", "fp8"):
        assert trained[name].steps_done == 10 and trained[name].final_file.exists()
        with with_adapter(full, trained[name].final_file) as adapted:
            decrease[name] = before - fixed_eval_loss(adapted, data)
    # Measured: both lower the demo's fixed-noise loss by 0.053 (of 1.165),
    # within 0.5 % of each other; the step losses agree to 0.7 %.
    assert decrease["auto"] > 0.01 * before, decrease
    assert 0.5 < decrease["fp8"] / decrease["auto"] < 2, decrease
    torch.testing.assert_close(torch.tensor(trained["fp8"].losses),
                               torch.tensor(trained["auto"].losses), rtol=0.05, atol=0)


def test_the_exported_adapter_changes_the_full_model_as_it_changed_the_fp8_one(
    full, fp8, trained
):
    inputs = fixed_inputs(full, 0)
    changes = []
    for sd in (full, fp8):
        plain = run_model(sd.text_encoder, sd.unet, inputs).noise
        with with_adapter(sd, trained["fp8"].final_file) as adapted:
            changes.append(run_model(adapted.text_encoder, adapted.unet, inputs).noise - plain)
    on_full, on_fp8 = changes
    # Measured: the changes (16 % of the output) differ by 15 % (relative L2),
    # a cosine of 0.989: the fp8 layers after an adapted one shift its change a little.
    relative = float((on_full - on_fp8).norm() / on_full.norm())
    cosine = float(torch.nn.functional.cosine_similarity(on_full.flatten(), on_fp8.flatten(), 0))
    assert float(on_full.norm()) > 0 and relative < 0.3 and cosine > 0.95, (relative, cosine)


def test_the_exported_file_records_the_base_precision(trained):
    for name, fp8_base in (("auto", "False"), ("fp8", "True")):
        with safe_open(str(trained[name].final_file), "pt") as file:
            metadata = file.metadata()
        assert metadata["ss_base_precision"] == name
        assert metadata["ss_fp8_base"] == fp8_base  # kohya's key


def test_a_preview_on_an_fp8_base_is_finite(trained):
    from PIL import Image

    assert len(trained["latents"]) == 1 and torch.isfinite(trained["latents"][0]).all()
    samples = sorted((trained["out"] / "fp8" / "samples").glob("*.png"))
    assert len(samples) == 1
    pixels = torch.tensor(list(Image.open(samples[0]).convert("L").getdata()), dtype=torch.float)
    assert float(pixels.std()) > 1  # not one flat colour (what NaN decodes to)


@pytest.mark.parametrize("base, mixed, stored", [
    ("bf16", "no", torch.bfloat16),  # runs in bf16
    ("fp32", "bf16", torch.float32),  # autocast computes in bf16
    ("bf16", "bf16", torch.bfloat16),
])  # fmt: skip
def test_fp32_and_bf16_store_the_frozen_weights_in_that_dtype(demo_model_dir, base, mixed,
                                                             stored):
    sd = load_model(config(demo_model_dir, **{"model.base_precision": base,
                                              "train.mixed_precision": mixed}), CPU)
    for part in (sd.unet, sd.text_encoder):
        assert {p.dtype for p in part.parameters()} == {stored}
        assert part.dtype == stored and not quantized_weights(part)
    assert {p.dtype for p in sd.vae.parameters()} == {torch.float32}


def test_fp8_under_bf16_mixed_precision_computes_in_bf16(demo_model_dir):
    sd = load_model(config(demo_model_dir, **{"model.base_precision": "fp8",
                                              "train.mixed_precision": "bf16"}), CPU)
    weights = quantized_weights(sd.unet)
    assert weights and {w.codes.dtype for w in weights} == {FP8}
    assert {w.dtype for w in weights} == {torch.bfloat16} and sd.unet.dtype == torch.bfloat16


def refusal(demo_model_dir, device=CPU, **overrides) -> str:
    with pytest.raises(UserError) as caught:
        check_base_precision(config(demo_model_dir, **overrides), device)
    return str(caught.value)


def test_fp16_without_fp16_mixed_precision_is_refused_naming_both_settings(demo_model_dir):
    for mixed in ("no", "bf16"):
        message = refusal(demo_model_dir, **{"model.base_precision": "fp16",
                                             "train.mixed_precision": mixed})
        assert message.startswith(
            f'model.base_precision = "fp16" with train.mixed_precision = "{mixed}": ')
        assert 'Set train.mixed_precision = "fp16" on a GPU' in message
    # With fp16 mixed precision the combination holds; the CPU refuses fp16 itself.
    check_base_precision(config(demo_model_dir, **{"model.base_precision": "fp16",
                                                   "train.mixed_precision": "fp16"}), CPU)


def test_nf4_is_refused_on_a_cpu_and_without_bitsandbytes(demo_model_dir, monkeypatch):
    nf4 = {"model.base_precision": "nf4"}
    message = refusal(demo_model_dir, **nf4)
    assert message.startswith('model.base_precision = "nf4" needs a CUDA GPU')
    assert 'this run is on the CPU. Use model.base_precision = "fp8"' in message
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails
    message = refusal(demo_model_dir, torch.device("cuda"), **nf4)
    assert message.startswith('model.base_precision = "nf4" needs the bitsandbytes package')
    assert "pip install bitsandbytes" in message


def test_a_quantized_base_with_compile_is_refused_naming_both(demo_model_dir):
    message = refusal(demo_model_dir, **{"model.base_precision": "fp8", "train.compile": True})
    assert message.startswith('model.base_precision = "fp8" with train.compile = true: ')


class FakeBitsandbytes:
    """`bitsandbytes.functional`'s 4-bit calls, in plain torch on the CPU: the
    16 NF4 levels per block of 64 scaled by the block's absmax, two codes a
    byte. Checks our nf4 plumbing (layers, shapes, stored bytes, gradients);
    the real kernels need CUDA and are unmeasured here."""

    NF4 = torch.tensor([-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
                        0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0])

    class State:
        def __init__(self, absmax, shape, dtype):
            self.absmax, self.shape, self.dtype = absmax, shape, dtype
            self.code, self.state2 = FakeBitsandbytes.NF4, None

    @classmethod
    def quantize_4bit(cls, weight, blocksize, quant_type, compress_statistics):
        assert quant_type == "nf4" and weight.numel() % (2 * blocksize) == 0
        blocks = weight.float().reshape(-1, blocksize)
        absmax = blocks.abs().amax(1, keepdim=True)
        codes = (blocks / absmax).unsqueeze(-1).sub(cls.NF4).abs().argmin(-1).flatten()
        packed = (codes[0::2] * 16 + codes[1::2]).to(torch.uint8).view(-1, 1)
        return packed, cls.State(absmax, weight.shape, weight.dtype)

    @classmethod
    def dequantize_4bit(cls, packed, state):
        flat = packed.flatten().long()
        codes = torch.stack([flat // 16, flat % 16], 1).flatten()
        blocks = cls.NF4[codes].view(state.absmax.shape[0], -1) * state.absmax
        return blocks.view(state.shape).to(state.dtype)


def test_nf4_quantizes_the_linear_layers_and_fp8_the_convs(full, monkeypatch):
    from types import SimpleNamespace

    from trainer.base_precision import quantize_layers

    fake = SimpleNamespace(functional=FakeBitsandbytes)
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", FakeBitsandbytes)
    sd = copy.deepcopy(full)
    quantize_layers(sd.unet, "nf4", torch.float32, CPU)
    kinds = {type(m): {m.weight.codec.kind} for m in sd.unet.modules()
             if type(m) in (nn.Linear, nn.Conv2d)}
    assert kinds == {nn.Linear: {"nf4"}, nn.Conv2d: {"fp8"}}
    linear = next(m for m in sd.unet.modules() if type(m) is nn.Linear)
    assert linear.weight.stored_dtype == torch.uint8
    assert linear.weight.codec.packed.numel() * 2 == linear.weight.numel()  # 4 bits a weight
    state, grads = adapter_gradients(sd, SPECS["locon-dora"])
    _, expected = adapter_gradients(dequantized_copy(sd), SPECS["locon-dora"], state)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-7, msg=name)
    inputs = fixed_inputs(full, 0)
    reference = run_model(full.text_encoder, full.unet, inputs)
    with torch.no_grad():
        noise = sd.unet(inputs["latents"], inputs["timesteps"], reference.text).sample
    error = float((noise - reference.noise).norm() / reference.noise.norm())
    # Measured with these NF4 levels (convs fp8): 9.0-9.5 %, against fp8's 7.8-8.7 %.
    assert 0 < error < 0.2, error
