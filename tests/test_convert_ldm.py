"""`python -m networks convert` on kohya-style files with names loaders miss:
LDM-layout U-Net names (held against trainer/ldm_keys.py over every layer of
the demo and SD1.5 U-Nets, and a round trip of our own file), lycoris-lora's
`lora_te_encoder_...` names under transformers >= 5.6 and its `lycoris_`
prefix (repaired files give lycoris' own outputs), and what is refused."""

from __future__ import annotations

import copy
import json

import pytest
import safetensors
import safetensors.torch
import torch
from diffusers import UNet2DConditionModel
from lycoris import LycorisNetwork, create_lycoris
from lycoris.kohya import LycorisNetworkKohya, create_network
from torch import nn

from core.errors import UserError
from networks.convert import convert_file
from networks.convert_kohya import KIND_LDM, KIND_LYCORIS, KIND_TEXT_MODEL, rename_module
from networks.export import export_network, load_network
from networks.inspect import inspect_file
from networks.ldm_names import ldm_to_diffusers
from networks.metadata import ExportInfo
from networks.network import AdapterNetwork
from networks.targets import UNET_PREFIX, kohya_name
from tests.sd_fixtures import NETWORK_CASES, assert_outputs_close, fixed_inputs, randomize, run
from trainer.ldm_keys import UNET_PREFIX as LDM_UNET_PREFIX
from trainer.ldm_keys import unet_to_ldm
from trainer.sd15_config import load_sd15_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LYCORIS_CLASS_SETTINGS = (
    "ENABLE_CONV", "UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME",
    "TEXT_ENCODER_TARGET_REPLACE_MODULE", "TEXT_ENCODER_TARGET_REPLACE_NAME", "MODULE_ALGO_MAP",
    "NAME_ALGO_MAP", "USE_FNMATCH", "TARGET_EXCLUDE_NAME", "TARGET_REPLACE_MODULE",
    "TARGET_REPLACE_NAME", "LORA_PREFIX",
)


def quiet(*_args) -> None:
    """Progress callback for in-process conversions."""


@pytest.fixture
def sd(demo_sd):
    return copy.deepcopy(demo_sd)


@pytest.fixture(scope="module")
def inputs(demo_sd):
    return fixed_inputs(demo_sd)


@pytest.fixture
def lycoris_settings(monkeypatch):
    """lycoris applies a preset to its classes' attributes: put them back afterwards."""
    for cls in (LycorisNetworkKohya, LycorisNetwork):
        for name in LYCORIS_CLASS_SETTINGS:
            if hasattr(cls, name):
                monkeypatch.setattr(cls, name, getattr(cls, name))


def ldm_to_ours_by_trainer(unet: nn.Module) -> dict[str, str]:
    """LDM-layout kohya name -> our kohya name for every Linear and Conv2d of
    `unet`, as trainer/ldm_keys.py maps the layers' checkpoint keys."""
    paths = [p for p, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    ldm = unet_to_ldm({f"{p}.weight": p for p in paths}, unet.config.layers_per_block)
    return {kohya_name(UNET_PREFIX, k.removeprefix(LDM_UNET_PREFIX).removesuffix(".weight")):
            kohya_name(UNET_PREFIX, p) for k, p in ldm.items()}


@pytest.mark.parametrize("model", ["demo", "sd15"])
def test_ldm_names_map_as_trainer_ldm_keys_does_for_every_layer(model, demo_sd):
    if model == "demo":
        unet = demo_sd.unet
    else:
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(load_sd15_config("unet"))
    expected = ldm_to_ours_by_trainer(unet)
    # 192 attention layers, 80 resnet layers, 6 samplers, conv_in/out, the time embedding's 2.
    assert len(expected) == 192 + 80 + 6 + 4
    got = {ldm: rename_module(ldm) for ldm in expected}
    assert got == {ldm: (ours, KIND_LDM) for ldm, ours in expected.items()}


def test_ldm_names_that_name_no_layer_are_not_mapped():
    for name in ("input_blocks_0_1_proj_in", "input_blocks_3_1_proj_in", "input_blocks_1_0_op",
                 "middle_block_3_in_layers_2", "output_blocks_1_1_conv",
                 "input_blocks_1_1_transformer_blocks_0_attn3_to_q", "out_1"):
        assert ldm_to_diffusers(name) is None, name
    assert ldm_to_diffusers("input_blocks_3_0_op") == "down_blocks_0_downsamplers_0_conv"
    assert ldm_to_diffusers("output_blocks_2_1_conv") == "up_blocks_0_upsamplers_0_conv"
    assert ldm_to_diffusers("output_blocks_5_2_conv") == "up_blocks_1_upsamplers_0_conv"


def test_an_ldm_named_file_converts_back_to_our_names_and_tensors(sd, tmp_path):
    ours = tmp_path / "ours.safetensors"
    network = AdapterNetwork.create(NETWORK_CASES["locon"], sd.unet, sd.text_encoder).attach()
    randomize(network)
    export_network(network, ours, ExportInfo(title="ldm round trip"), "fp32")
    with safetensors.safe_open(str(ours), "pt") as f:
        metadata = f.metadata()
    tensors = safetensors.torch.load_file(str(ours))
    to_ldm = {v: k for k, v in ldm_to_ours_by_trainer(sd.unet).items()}
    renamed = {}
    for key, value in tensors.items():
        name, _, suffix = key.partition(".")
        renamed[f"{to_ldm.get(name, name)}.{suffix}"] = value
    ldm_file = tmp_path / "ldm.safetensors"
    safetensors.torch.save_file(renamed, str(ldm_file), metadata)
    assert any("LDM-style" in w for w in inspect_file(str(ldm_file)).warnings)

    out = tmp_path / "converted.safetensors"
    conversion = convert_file(ldm_file, out, progress=quiet)
    unet_modules = len(network.unet_adapters)
    assert conversion.counts[KIND_LDM] == unet_modules and unet_modules > 192
    converted = safetensors.torch.load_file(str(out))
    assert converted.keys() == tensors.keys()
    assert all(torch.equal(converted[k], tensors[k]) for k in tensors)
    with safetensors.safe_open(str(out), "pt") as f:
        kept = f.metadata()
    assert {k: kept[k] for k in metadata if not k.startswith("sshs_")} == {
        k: v for k, v in metadata.items() if not k.startswith("sshs_")}
    assert json.loads(kept["ss_lora_tools"])[-1]["tool"] == "convert"
    assert not inspect_file(str(out)).warnings


@pytest.mark.parametrize("algo", ["lora", "lokr"])
def test_a_lycoris_file_with_lora_te_encoder_names_is_repaired(
    algo, sd, inputs, tmp_path, lycoris_settings
):
    # Not shimmed: lycoris names the flattened text encoder's layers `encoder_layers_...`.
    lycoris_net = create_network(1.0, 4, 2, None, sd.text_encoder, sd.unet, algo=algo,
                                 preset="attn-mlp")
    assert lycoris_net.text_encoder_loras[0].lora_name.startswith("lora_te_encoder_layers_")
    lycoris_net.apply_to(sd.text_encoder, sd.unet, apply_text_encoder=True, apply_unet=True)
    randomize(lycoris_net)
    expected = run(sd.text_encoder, sd.unet, inputs)
    source = tmp_path / "lycoris.safetensors"
    lycoris_net.save_weights(str(source), torch.float32, {})
    lycoris_net.restore()
    assert any("lack `text_model_`" in p for p in inspect_file(str(source)).problems)

    out = tmp_path / "repaired.safetensors"
    conversion = convert_file(source, out, progress=quiet)
    assert conversion.counts[KIND_TEXT_MODEL] == 72
    assert inspect_file(str(out)).problems == []
    clean = copy.deepcopy(sd)
    load_network(out, clean.unet, clean.text_encoder).attach()
    assert_outputs_close(run(clean.text_encoder, clean.unet, inputs), expected,
                         rtol=1e-5, atol=1e-5)


def test_a_lycoris_prefixed_text_encoder_file_is_repaired(sd, inputs, tmp_path, lycoris_settings):
    lycoris_net = create_lycoris(sd.text_encoder, 1.0, 4, 2, algo="loha", preset="attn-mlp")
    lycoris_net.apply_to()
    randomize(lycoris_net)
    expected = run(sd.text_encoder, sd.unet, inputs).text
    source = tmp_path / "lycoris.safetensors"
    lycoris_net.save_weights(str(source), torch.float32, {})
    lycoris_net.restore()
    with safetensors.safe_open(str(source), "pt") as f:
        assert next(iter(f.keys())).startswith("lycoris_encoder_layers_")

    out = tmp_path / "repaired.safetensors"
    assert convert_file(source, out, progress=quiet).counts == {KIND_LYCORIS: 72}
    with safetensors.safe_open(str(out), "pt") as f:
        assert all(k.startswith("lora_te_text_model_encoder_layers_") for k in f.keys())
    assert inspect_file(str(out)).problems == []
    clean = copy.deepcopy(sd)
    load_network(out, None, clean.text_encoder).attach()
    torch.testing.assert_close(run(clean.text_encoder, clean.unet, inputs).text, expected,
                               rtol=1e-5, atol=1e-5)


def module_file(path, names: list[str]) -> None:
    tensors = {}
    for name in names:
        tensors |= {f"{name}.lora_down.weight": torch.ones(2, 32),
                    f"{name}.lora_up.weight": torch.ones(32, 2), f"{name}.alpha": torch.tensor(2.)}
    safetensors.torch.save_file(tensors, str(path))


def test_names_it_cannot_map_or_that_collide_are_refused(tmp_path):
    ok = "lora_unet_input_blocks_1_1_proj_in"
    source, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    module_file(source, [ok, "lora_unet_input_blocks_0_1_proj_in"])
    with pytest.raises(UserError, match=r"3 keys .*'lora_unet_input_blocks_0_1_proj_in\."):
        convert_file(source, out, progress=quiet)
    assert convert_file(source, out, drop_unknown=True, progress=quiet).dropped == [
        f"lora_unet_input_blocks_0_1_proj_in.{s}" for s in ("alpha", "lora_down.weight",
                                                            "lora_up.weight")]
    assert all(k.startswith("lora_unet_down_blocks_0_attentions_0_proj_in.")
               for k in safetensors.torch.load_file(str(out)))

    module_file(source, ["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"])
    with pytest.raises(UserError, match="SDXL"):
        convert_file(source, out, progress=quiet)
    module_file(source, [ok, "lora_unet_down_blocks_0_attentions_0_proj_in"])
    with pytest.raises(UserError, match="two modules for the layer"):
        convert_file(source, out, progress=quiet)
