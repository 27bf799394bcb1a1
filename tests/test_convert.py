"""`python -m networks convert` on diffusers/PEFT LoRA files made by `peft` on the
demo model: the converted kohya file gives the outputs of the PEFT-adapted model
in our loader and in diffusers' `load_lora_weights`, whatever sets the scale
(LoraConfig in the header or adapter_config.json, rank/alpha patterns, rsLoRA,
`.alpha` keys, none); the older diffusers key styles; PEFT's DoRA; refusals."""

from __future__ import annotations

import copy
import json

import pytest
import safetensors
import safetensors.torch
import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig, get_peft_model, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict

from core.errors import UserError
from networks.__main__ import main as networks_main
from networks.convert import convert_file
from networks.export import load_network
from networks.inspect import inspect_file
from tests.sd_fixtures import Outputs, assert_outputs_close, fixed_inputs, run
from trainer.model_loading import build_pipeline

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                "ff.net.2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
# alpha != rank, and patterns that give some layers their own rank and alpha.
UNET_CONFIG = dict(r=4, lora_alpha=8, target_modules=UNET_TARGETS,
                   rank_pattern={"proj_out": 2}, alpha_pattern={"ff.net.2": 3})
TEXT_CONFIG = dict(r=2, lora_alpha=1, target_modules=TEXT_TARGETS)
RTOL, ATOL = 1e-4, 1e-5
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def quiet(*_args) -> None:
    """Progress callback for in-process conversions."""


@pytest.fixture(scope="module")
def inputs(demo_sd):
    return fixed_inputs(demo_sd)


@torch.no_grad()
def randomize_lora(model: torch.nn.Module, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_magnitude_vector" in name:
            param.mul_(1 + 0.2 * torch.randn(param.shape, generator=generator))
        elif "lora_" in name:
            param.copy_(0.1 * torch.randn(param.shape, generator=generator))


def peft_adapted(demo_sd, unet_config: dict | None, text_config: dict | None):
    """A copy of the demo model with PEFT LoRA layers injected (random, non-zero)."""
    sd = copy.deepcopy(demo_sd)
    for model, config in ((sd.unet, unet_config), (sd.text_encoder, text_config)):
        if config is not None:
            inject_adapter_in_model(LoraConfig(**config), model)
            randomize_lora(model)
    return sd


def save_diffusers(sd, path, unet_config=None, text_config=None, with_metadata=True):
    """The way diffusers' training scripts save a LoRA."""
    layers = {}
    if unet_config:
        layers["unet_lora_layers"] = get_peft_model_state_dict(sd.unet)
    if text_config:
        layers["text_encoder_lora_layers"] = get_peft_model_state_dict(sd.text_encoder)
    if with_metadata:
        for name, config in (("unet", unet_config), ("text_encoder", text_config)):
            if config:
                layers[f"{name}_lora_adapter_metadata"] = LoraConfig(**config).to_dict()
    StableDiffusionPipeline.save_lora_weights(path, **layers)
    return path / "pytorch_lora_weights.safetensors"


def diffusers_outputs(demo_sd, inputs, path) -> Outputs:
    pipe = build_pipeline(copy.deepcopy(demo_sd))
    pipe.load_lora_weights(str(path))
    return run(pipe.text_encoder, pipe.unet, inputs)


def our_outputs(demo_sd, inputs, path) -> Outputs:
    sd = copy.deepcopy(demo_sd)
    load_network(path, sd.unet, sd.text_encoder).attach()
    return run(sd.text_encoder, sd.unet, inputs)


def test_a_diffusers_saved_peft_lora_converts_with_the_same_outputs(demo_sd, inputs, tmp_path):
    adapted = peft_adapted(demo_sd, UNET_CONFIG, TEXT_CONFIG)
    expected = run(adapted.text_encoder, adapted.unet, inputs)
    source = save_diffusers(adapted, tmp_path / "diffusers", UNET_CONFIG, TEXT_CONFIG)
    # The reference route: diffusers reads its own file as PEFT applied it.
    assert_outputs_close(diffusers_outputs(demo_sd, inputs, source), expected, RTOL, ATOL)

    out = tmp_path / "kohya.safetensors"
    conversion = convert_file(source, out, "fp32", progress=quiet)
    assert conversion.counts == {"U-Net LoRA": 192, "text-encoder LoRA": 72}
    assert "lora_adapter_metadata" in conversion.kind
    assert_outputs_close(our_outputs(demo_sd, inputs, out), expected, RTOL, ATOL)
    assert_outputs_close(diffusers_outputs(demo_sd, inputs, out), expected, RTOL, ATOL)

    tensors = safetensors.torch.load_file(str(out))
    to_q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    ff_out = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2"
    proj_out = "lora_unet_down_blocks_0_attentions_0_proj_out"
    q_proj = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert {k: float(tensors[f"{k}.alpha"]) for k in (to_q, ff_out, proj_out, q_proj)} == {
        to_q: 8.0, ff_out: 3.0, proj_out: 8.0, q_proj: 1.0}
    assert tensors[f"{proj_out}.lora_down.weight"].shape[0] == 2
    report = inspect_file(str(out))
    assert report.problems == [] and report.metadata["ss_network_module"] == "networks.lora"
    assert "lora_adapter_metadata" not in report.metadata
    assert report.metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"


@pytest.mark.parametrize("component", ["unet", "text_encoder"])
def test_a_peft_save_pretrained_folder_takes_its_adapter_config(
    component, demo_sd, inputs, tmp_path
):
    sd = copy.deepcopy(demo_sd)
    targets = UNET_TARGETS if component == "unet" else TEXT_TARGETS
    config = LoraConfig(r=4, lora_alpha=6, target_modules=targets, use_rslora=True,
                        alpha_pattern={"to_k" if component == "unet" else "k_proj": 2})
    model = get_peft_model(getattr(sd, component), config)
    randomize_lora(model)
    expected = run(sd.text_encoder, sd.unet, inputs)
    model.save_pretrained(str(tmp_path / "peft"))
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["use_rslora"]

    out = tmp_path / "kohya.safetensors"
    conversion = convert_file(tmp_path / "peft", out, "fp32", progress=quiet)
    assert "adapter_config.json" in conversion.kind
    assert sum(conversion.counts.values()) == (192 if component == "unet" else 72)
    assert_outputs_close(our_outputs(demo_sd, inputs, out), expected, RTOL, ATOL)
    # rsLoRA's scale alpha / sqrt(r) as kohya's alpha / rank: alpha * sqrt(r).
    alphas = {float(v) for k, v in safetensors.torch.load_file(str(out)).items()
              if k.endswith(".alpha")}
    assert alphas == {6.0 * 2, 2.0 * 2}


def rename_old_style(tensors: dict[str, torch.Tensor], style: str) -> dict[str, torch.Tensor]:
    """PEFT keys in diffusers' pre-PEFT layouts, which its loader still reads: U-Net
    `lora.down`, text encoder `lora_linear_layer.down`, or the attention-processor
    `processor.to_q_lora.down` (U-Net) / `self_attn.to_q_lora.down` (text encoder)."""
    renamed = {}
    for key, value in tensors.items():
        new = key.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up.")
        if new.startswith("text_encoder."):
            new = new.replace(".lora.", ".lora_linear_layer.")
        if style == "attention processor":
            for child in ("to_q", "to_k", "to_v"):
                new = new.replace(f".{child}.lora.", f".processor.{child}_lora.")
            new = new.replace(".to_out.0.lora.", ".processor.to_out_lora.")
            for child, old in (("q_proj", "to_q"), ("k_proj", "to_k"), ("v_proj", "to_v"),
                               ("out_proj", "to_out")):
                new = new.replace(f".{child}.lora_linear_layer.", f".{old}_lora.")
        renamed[new] = value
    return renamed


@pytest.mark.parametrize("style", ["alpha keys", "lora.down", "attention processor"])
def test_files_without_a_config_keep_their_scale(style, demo_sd, inputs, tmp_path):
    # Without a config diffusers applies scale 1 (alpha = rank); `.alpha` keys say otherwise.
    alpha = 8 if style == "alpha keys" else 4
    unet_config = dict(r=4, lora_alpha=alpha, target_modules=UNET_TARGETS)
    text_config = dict(r=4, lora_alpha=alpha, target_modules=TEXT_TARGETS)
    adapted = peft_adapted(demo_sd, unet_config, text_config)
    expected = run(adapted.text_encoder, adapted.unet, inputs)
    saved = safetensors.torch.load_file(str(save_diffusers(
        adapted, tmp_path / "diffusers", unet_config, text_config, with_metadata=False)))
    if style == "alpha keys":
        saved |= {k.replace(".lora_A.weight", ".alpha"): torch.tensor(8.0)
                  for k in saved if k.endswith(".lora_A.weight")}
    else:
        saved = rename_old_style(saved, style)
    source = tmp_path / "source.safetensors"
    safetensors.torch.save_file(saved, str(source))
    if style != "alpha keys":
        # diffusers reads these key styles as the same adapter.
        assert_outputs_close(diffusers_outputs(demo_sd, inputs, source), expected, RTOL, ATOL)

    out = tmp_path / "kohya.safetensors"
    conversion = convert_file(source, out, progress=quiet)
    assert conversion.counts == {"U-Net LoRA": 192, "text-encoder LoRA": 72}
    assert_outputs_close(our_outputs(demo_sd, inputs, out), expected, RTOL, ATOL)
    alphas = {float(v) for k, v in safetensors.torch.load_file(str(out)).items()
              if k.endswith(".alpha")}
    assert alphas == {float(alpha)}


def test_peft_dora_becomes_an_output_axis_dora_scale(demo_sd, inputs, tmp_path):
    unet_config = dict(r=4, lora_alpha=2, target_modules=UNET_TARGETS, use_dora=True)
    adapted = peft_adapted(demo_sd, unet_config, None)
    expected = run(adapted.text_encoder, adapted.unet, inputs)
    source = save_diffusers(adapted, tmp_path / "diffusers", unet_config)

    out = tmp_path / "kohya.safetensors"
    conversion = convert_file(source, out, "fp32", progress=quiet)
    assert conversion.counts == {"U-Net LoRA": 192, "with DoRA (output axis)": 192}
    assert_outputs_close(our_outputs(demo_sd, inputs, out), expected, RTOL, ATOL)
    report = inspect_file(str(out))
    assert report.dora == {"output": 192} and report.problems == []
    assert json.loads(report.metadata["ss_network_args"]) == {
        "algo": "lora", "dora_wd": "True", "wd_on_output": "True"}


def test_unknown_keys_are_refused_or_dropped_and_listed(demo_sd, tmp_path):
    adapted = peft_adapted(demo_sd, None, TEXT_CONFIG)
    saved = safetensors.torch.load_file(str(save_diffusers(
        adapted, tmp_path / "diffusers", None, TEXT_CONFIG, with_metadata=False)))
    saved["text_encoder.text_projection.weight"] = torch.ones(2, 2)
    source = tmp_path / "source.safetensors"
    safetensors.torch.save_file(saved, str(source))
    out = tmp_path / "out.safetensors"
    with pytest.raises(UserError, match=r"1 keys .*'text_encoder.text_projection.weight'"):
        convert_file(source, out, progress=quiet)
    assert not out.exists()
    conversion = convert_file(source, out, drop_unknown=True, progress=quiet)
    assert conversion.dropped == ["text_encoder.text_projection.weight"]
    assert len(safetensors.torch.load_file(str(out))) == 72 * 3


def test_inputs_it_refuses(demo_sd, tmp_path):
    adapted = peft_adapted(demo_sd, None, TEXT_CONFIG)
    source = save_diffusers(adapted, tmp_path / "diffusers", None, TEXT_CONFIG)
    with pytest.raises(UserError, match="is the input file"):
        convert_file(source, source, progress=quiet)
    with pytest.raises(UserError, match="must end in .safetensors"):
        convert_file(source, tmp_path / "out.ckpt", progress=quiet)
    with pytest.raises(UserError, match="does not exist"):
        convert_file(tmp_path / "missing.safetensors", tmp_path / "out.safetensors", progress=quiet)
    pickle = tmp_path / "lora.bin"
    torch.save({"unet.x.lora_A.weight": torch.ones(1)}, pickle)
    with pytest.raises(UserError, match="not a .safetensors file"):
        convert_file(pickle, tmp_path / "out.safetensors", progress=quiet)
    (tmp_path / "folder").mkdir()
    torch.save({}, tmp_path / "folder" / "adapter_model.bin")
    with pytest.raises(UserError, match="adapter_model.bin, a pickle file"):
        convert_file(tmp_path / "folder", tmp_path / "out.safetensors", progress=quiet)
    checkpoint = tmp_path / "model.safetensors"
    safetensors.torch.save_file({"model.diffusion_model.out.2.weight": torch.ones(1)},
                                str(checkpoint))
    with pytest.raises(UserError, match="not a LoRA file this tool knows"):
        convert_file(checkpoint, tmp_path / "out.safetensors", progress=quiet)
    assert not (tmp_path / "out.safetensors").exists()


def test_the_cli_reports_and_ends_with_the_written_path(demo_sd, tmp_path, capsys):
    adapted = peft_adapted(demo_sd, None, TEXT_CONFIG)
    source = save_diffusers(adapted, tmp_path / "diffusers", None, TEXT_CONFIG)
    out = tmp_path / "converted.safetensors"
    assert networks_main(["convert", str(source), "--out", str(out), "--precision", "fp16"]) == 0
    printed = capsys.readouterr()
    lines = printed.out.strip().splitlines()
    assert lines[-1] == f"wrote: {out}"
    assert "mapped: 72 modules, text-encoder LoRA" in lines
    assert "progress: 72/72 " in printed.err
    with safetensors.safe_open(str(out), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert networks_main(["convert", str(out), "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error: ")
