"""Exported files: our own reload, LyCORIS and diffusers must see the same
adapter as our in-memory network; metadata, hashes, precision and inspect."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import safetensors
import torch
from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights
from torch import nn

from core.errors import UserError
from networks.export import export_network, load_network
from networks.hashes import model_hash, tensor_data
from networks.metadata import MODELSPEC_REQUIRED, SS_MINIMUM, ExportInfo
from networks.network import AdapterNetwork
from tests.sd_fixtures import NETWORK_CASES, assert_outputs_close, fixed_inputs, randomize, run
from trainer.model_loading import build_pipeline


@pytest.fixture
def sd(demo_sd):
    return copy.deepcopy(demo_sd)


@pytest.fixture(scope="module")
def inputs(demo_sd):
    return fixed_inputs(demo_sd)


def trained_file(sd, case: str, path, precision="fp32", **info):
    network = AdapterNetwork.create(NETWORK_CASES[case], sd.unet, sd.text_encoder).attach()
    randomize(network)
    export_network(network, path, ExportInfo(**info), precision)
    return network


class TextModelShim(nn.Module):
    """Gives a flattened (transformers >= 5.6) CLIPTextModel back its
    `text_model.` path, the way A1111 and ComfyUI address the text encoder."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_model = text_encoder


@pytest.mark.parametrize("case", NETWORK_CASES)
def test_reloaded_file_gives_the_same_outputs(case, sd, inputs, tmp_path):
    path = tmp_path / "adapter.safetensors"
    network = trained_file(sd, case, path)
    expected = run(sd.text_encoder, sd.unet, inputs)
    network.detach()

    reloaded = load_network(path, sd.unet, sd.text_encoder).attach()
    assert_outputs_close(run(sd.text_encoder, sd.unet, inputs), expected, rtol=0, atol=0)
    assert reloaded.spec.algorithm == NETWORK_CASES[case].algorithm
    assert reloaded.spec.tucker == NETWORK_CASES[case].tucker


@pytest.mark.parametrize("case", NETWORK_CASES)
def test_lycoris_loads_our_file_with_the_same_outputs(case, sd, inputs, tmp_path, monkeypatch):
    # lycoris 4.1.3 first builds (and then discards) modules from its default
    # preset, which lists time_embedding both by class and by name and trips its
    # own duplicate check; the modules it loads from our file are unaffected.
    monkeypatch.setattr(LycorisNetworkKohya, "UNET_TARGET_REPLACE_NAME", [])
    path = tmp_path / "adapter.safetensors"
    network = trained_file(sd, case, path)
    expected = run(sd.text_encoder, sd.unet, inputs)
    network.detach()

    shim = TextModelShim(sd.text_encoder)
    lycoris_net, weights = create_network_from_weights(1.0, str(path), None, shim, sd.unet)
    assert len(lycoris_net.unet_loras) == len(network.unet_adapters)
    assert len(lycoris_net.text_encoder_loras) == len(network.text_encoder_adapters)
    lycoris_net.apply_to(shim, sd.unet, apply_text_encoder=True, apply_unet=True)
    lycoris_net.load_state_dict(weights, strict=False)
    assert_outputs_close(run(sd.text_encoder, sd.unet, inputs), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["lora", "locon"])
def test_diffusers_load_lora_weights_then_fuse_matches_our_merge(case, sd, inputs, tmp_path):
    path = tmp_path / "adapter.safetensors"
    pipe = build_pipeline(copy.deepcopy(sd))
    network = trained_file(sd, case, path)
    network.merge()
    expected = run(sd.text_encoder, sd.unet, inputs)

    pipe.load_lora_weights(str(path))
    pipe.fuse_lora()
    assert_outputs_close(run(pipe.text_encoder, pipe.unet, inputs), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("precision, dtype", [("fp16", "F16"), ("bf16", "BF16"), ("fp32", "F32")])
def test_save_precision_and_metadata(precision, dtype, sd, tmp_path):
    path = tmp_path / "adapter.safetensors"
    trained_file(
        sd,
        "loha",
        path,
        precision,
        title="My style",
        trigger_phrase="mystyle",
        tag_frequency={"10_mystyle": {"mystyle": 3, "red hair": 1}},
    )
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    meta = header.pop("__metadata__")
    assert {v["dtype"] for k, v in header.items() if not k.endswith(".alpha")} == {dtype}
    assert all(header[k]["shape"] == [] for k in header if k.endswith(".alpha"))
    assert set(SS_MINIMUM) <= set(meta) and set(MODELSPEC_REQUIRED) <= set(meta)
    assert meta["sshs_model_hash"] == model_hash(tensor_data(raw))
    assert json.loads(meta["ss_network_args"])["algo"] == "loha"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.trigger_phrase"] == "mystyle"
    assert json.loads(meta["ss_tag_frequency"]) == {"10_mystyle": {"mystyle": 3, "red hair": 1}}
    assert all(isinstance(v, str) for v in meta.values())


def test_text_encoder_keys_use_the_text_model_prefix(sd, tmp_path):
    path = tmp_path / "adapter.safetensors"
    trained_file(sd, "lora", path)
    with safetensors.safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    te_keys = [k for k in keys if k.startswith("lora_te_")]
    assert te_keys and all(k.startswith("lora_te_text_model_encoder_layers_") for k in te_keys)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha" in keys


def test_atomic_write_keeps_the_old_file_when_writing_fails(sd, tmp_path, monkeypatch):
    path = tmp_path / "adapter.safetensors"
    trained_file(sd, "lora", path)
    before = path.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("core.atomic.os.fsync", disk_full)
    with pytest.raises(UserError, match="No space left on device.*untouched"):
        trained_file(sd, "lora", path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.safetensors"]


def test_loading_a_broken_or_foreign_file_is_a_clear_error(sd, tmp_path):
    truncated = tmp_path / "truncated.safetensors"
    trained_file(sd, "lora", tmp_path / "good.safetensors")
    truncated.write_bytes((tmp_path / "good.safetensors").read_bytes()[:5000])
    with pytest.raises(UserError, match="truncated.safetensors is not a readable safetensors"):
        load_network(truncated, sd.unet, sd.text_encoder)
    foreign = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file(
        {
            "lora_unet_nothing_here.lora_down.weight": torch.ones(2, 2),
            "lora_unet_nothing_here.lora_up.weight": torch.ones(2, 2),
        },
        foreign,
    )
    with pytest.raises(UserError, match="does not fit this base model.*lora_unet_nothing_here"):
        load_network(foreign, sd.unet, sd.text_encoder)


def inspect_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "networks", "inspect", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_inspect_reports_counts_and_flags_problems(sd, tmp_path):
    path = tmp_path / "locon.safetensors"
    trained_file(sd, "locon", path, title="Inspect me")
    result = inspect_cli(path, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["unet_modules"] > 192 and report["text_encoder_modules"] == 72
    assert report["algorithms"] == {"lora": report["unet_modules"] + 72}
    assert report["metadata"]["modelspec.title"] == "Inspect me"
    assert report["problems"] == []

    tensors, _ = safetensors.torch.load_file(path), None
    bad = {k.replace("lora_te_text_model_", "lora_te_"): v for k, v in tensors.items()}
    bad["lora_unet_mystery.weird"] = torch.ones(1)
    bad["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"][0] = float("nan")
    bad_path = tmp_path / "bad.safetensors"
    safetensors.torch.save_file(bad, bad_path)
    result = inspect_cli(bad_path)
    assert result.returncode == 1
    assert "1 unknown modules (e.g. lora_unet_mystery)" in result.stdout
    assert "NaN/Inf" in result.stdout
    assert "lack `text_model_`" in result.stdout

    loha = tmp_path / "loha.safetensors"
    trained_file(sd, "loha", loha)
    text = inspect_cli(loha).stdout
    assert "loha (" in text and "diffusers load_lora_weights cannot load" in text

    missing = inspect_cli(tmp_path / "nope.safetensors")
    assert missing.returncode == 2 and "nope.safetensors does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr
