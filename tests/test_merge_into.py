"""`python -m trainer merge-into`: the written checkpoint computes what the
runtime merge and the hooked adapter compute, in both output layouts."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from networks.export import export_network, load_network
from networks.file_header import read_header
from networks.kohya_file import save_network_file
from networks.network import AdapterNetwork, NetworkSpec
from networks.targets import all_layers_by_name
from tests.sd_fixtures import NETWORK_CASES, assert_outputs_close, fixed_inputs, randomize, run
from tests.test_dora import randomize as randomize_dora
from trainer.cli import main
from trainer.merge import merge_adapters
from trainer.model_loading import load_sd_model

LORA = NetworkSpec("lora", rank=4, alpha=2)
DORA = NetworkSpec("lora", rank=4, alpha=2, dora=True)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def base_file(demo_model_dir):
    return demo_model_dir / "demo-sd15.safetensors"


@pytest.fixture(scope="module")
def base(base_file):
    return load_sd_model(base_file)


@pytest.fixture(scope="module")
def inputs(base):
    return fixed_inputs(base)


@pytest.fixture(scope="module")
def plain_lora(base, tmp_path_factory):
    return write_adapter(base, tmp_path_factory.mktemp("lora") / "style.safetensors", LORA)


def write_adapter(base, path, spec: NetworkSpec, seed: int = 1):
    sd = copy.deepcopy(base)
    network = AdapterNetwork.create(spec, sd.unet, sd.text_encoder)
    if spec.dora:
        randomize_dora(network.named_parameters(), seed)
    else:
        randomize(network, seed)
    export_network(network, path, _info(path), "fp32")
    return path


def _info(path):
    from networks.metadata import ExportInfo

    return ExportInfo(title=path.stem, output_name=path.stem)


def merge_cli(capsys, *args) -> tuple[int, str, str]:
    code = main(["merge-into", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def hooked_outputs(base, lora_file, inputs, weight: float = 1.0):
    sd = copy.deepcopy(base)
    network = load_network(lora_file, sd.unet, sd.text_encoder).attach()
    network.set_multiplier(weight)
    network.eval()
    return run(sd.text_encoder, sd.unet, inputs)


def runtime_merge_outputs(base, adapters, inputs):
    sd = copy.deepcopy(base)
    merge_adapters(sd, adapters)
    return run(sd.text_encoder, sd.unet, inputs)


def test_merged_file_computes_the_runtime_merge_and_the_hooked_adapter(
    base, base_file, plain_lora, inputs, tmp_path, capsys
):
    lora = plain_lora
    out = tmp_path / "merged.safetensors"
    code, stdout, stderr = merge_cli(capsys, "--model", base_file, "--lora", f"{lora}:0.8",
                                     "--out", out, "--precision", "fp32")
    assert code == 0, stderr
    assert stdout.strip().splitlines()[-1] == f"wrote: {out}"
    assert "progress: 6/6" in stderr

    merged = load_sd_model(out)
    outputs = run(merged.text_encoder, merged.unet, inputs)
    assert_outputs_close(outputs, runtime_merge_outputs(base, [(lora, 0.8)], inputs))
    assert_outputs_close(outputs, hooked_outputs(base, lora, inputs, 0.8))
    unmerged = run(base.text_encoder, base.unet, inputs)
    assert not torch.allclose(outputs.noise, unmerged.noise, atol=1e-3)

    # The key set of the demo single file, which A1111 and ComfyUI load.
    assert set(load_file(out)) == set(load_file(base_file))
    meta = read_header(out).metadata
    record = json.loads(meta["lora_merge"])
    assert record["base"] == base_file.name and record["precision"] == "fp32"
    assert record["loras"][0]["file"] == "style.safetensors"
    assert record["loras"][0]["weight"] == 0.8
    assert meta["modelspec.merged_from"] == f"{base_file.name}, style.safetensors:0.8"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"


@torch.no_grad()
def test_two_loras_at_their_weights_add_their_scaled_deltas(base, base_file, tmp_path, capsys):
    first = write_adapter(base, tmp_path / "a.safetensors", LORA, seed=1)
    second = write_adapter(base, tmp_path / "b.safetensors", NETWORK_CASES["locon"], seed=2)
    out = tmp_path / "two.safetensors"
    code, _, stderr = merge_cli(capsys, "--model", base_file, "--lora", f"{first}:0.7",
                                "--lora", f"{second}:0.3", "--out", out, "--precision", "fp32")
    assert code == 0, stderr

    merged = load_sd_model(out)
    merged_layers = all_layers_by_name(merged.unet, merged.text_encoder)
    expected: dict[str, torch.Tensor] = {}
    for path, weight in ((first, 0.7), (second, 0.3)):
        for adapter in load_network(path, base.unet, base.text_encoder).adapters:
            delta = weight * adapter.scaled_delta()
            expected[adapter.lora_name] = expected.get(adapter.lora_name, 0) + delta
    base_layers = all_layers_by_name(base.unet, base.text_encoder)
    assert any("_resnets_" in name for name in expected)  # the LoCon's conv layers
    for name, delta in expected.items():
        change = merged_layers[name].weight - base_layers[name].weight
        torch.testing.assert_close(change, delta, rtol=1e-5, atol=1e-6)
    untouched = set(base_layers) - set(expected)
    assert untouched  # e.g. conv_in: no file adapts it
    for name in untouched:
        assert torch.equal(merged_layers[name].weight, base_layers[name].weight)


@pytest.mark.parametrize("kind", ["lokr", "dora"])
def test_lokr_and_dora_files_merge_to_their_hooked_outputs(
    kind, base, base_file, inputs, tmp_path, capsys
):
    spec = DORA if kind == "dora" else NETWORK_CASES["lokr"]
    lora = write_adapter(base, tmp_path / f"{kind}.safetensors", spec)
    assert (kind == "dora") == any(k.endswith("dora_scale") for k in load_file(lora))
    out = tmp_path / f"merged-{kind}.safetensors"
    code, _, stderr = merge_cli(capsys, "--model", base_file, "--lora", lora, "--out", out,
                                "--precision", "fp32")
    assert code == 0, stderr
    merged = load_sd_model(out)
    outputs = run(merged.text_encoder, merged.unet, inputs)
    assert_outputs_close(outputs, hooked_outputs(base, lora, inputs))
    assert not torch.allclose(outputs.noise, run(base.text_encoder, base.unet, inputs).noise,
                              atol=1e-3)


def test_diffusers_output_loads_with_our_loader_and_diffusers(
    base, demo_model_dir, plain_lora, inputs, tmp_path, capsys
):
    from diffusers import StableDiffusionPipeline

    lora = plain_lora
    out = tmp_path / "merged-folder"
    code, stdout, stderr = merge_cli(capsys, "--model", demo_model_dir / "diffusers", "--lora",
                                     lora, "--out", out, "--precision", "fp32", "--diffusers")
    assert code == 0, stderr
    assert stdout.strip().splitlines()[-1] == f"wrote: {out}"
    expected = hooked_outputs(base, lora, inputs)

    ours = load_sd_model(out)
    assert_outputs_close(run(ours.text_encoder, ours.unet, inputs), expected)
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert_outputs_close(run(pipe.text_encoder, pipe.unet, inputs), expected)
    assert (out / "tokenizer" / "vocab.json").is_file()
    assert json.loads((out / "lora_merge.json").read_text())["modelspec.title"] == out.name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_fp16_output_is_fp16_and_other_keys_of_the_base_file_are_carried(
    base, base_file, plain_lora, tmp_path, capsys
):
    # A real SD1.5 file also holds the noise schedule and EMA weights.
    extras = {"alphas_cumprod": torch.linspace(0.99, 0.01, 1000, dtype=torch.float32),
              "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7)}
    source = tmp_path / "with-extras.safetensors"
    save_file({**load_file(base_file), **extras}, str(source))
    lora = plain_lora
    out = tmp_path / "half.safetensors"
    code, _, stderr = merge_cli(capsys, "--model", source, "--lora", lora, "--out", out)
    assert code == 0, stderr

    header = read_header(out).tensors
    model_keys = set(header) - set(extras)
    assert model_keys == set(load_file(base_file))
    floats = {k for k in model_keys if not k.endswith("position_ids")}
    assert {header[k].dtype for k in floats} == {"F16"}
    written = load_file(out)
    for key, value in extras.items():
        assert written[key].dtype == value.dtype and torch.equal(written[key], value)
    assert load_sd_model(out).unet.dtype == torch.float32  # loads, upcast by our loader


def _bad_lora(path, scale: float = 1.0, width: int | None = None):
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    width = width or 32
    tensors = {f"{name}.lora_down.weight": torch.full((4, width), scale),
               f"{name}.lora_up.weight": torch.full((32, 4), scale),
               f"{name}.alpha": torch.tensor(4.0)}
    save_network_file(path, tensors, {}, "fp32")
    return path


@pytest.mark.parametrize("case", ["missing-model", "misfit", "not-adapter", "out-is-folder",
                                  "out-is-model", "suffix", "diffusers-suffix", "overflow"])
def test_mistakes_are_one_error_paragraph_and_write_nothing(
    case, plain_lora, base_file, tmp_path, capsys
):
    out = tmp_path / "out.safetensors"
    args = {"--model": base_file, "--lora": plain_lora, "--out": out}
    extra: list[str] = []
    expected = {
        "missing-model": "does not exist", "misfit": "does not fit this base model",
        "not-adapter": "is not an adapter file", "out-is-folder": "is a folder",
        "out-is-model": "is one of the inputs", "suffix": "as .safetensors",
        "diffusers-suffix": "the output is a folder", "overflow": "overflows",
    }[case]
    if case == "missing-model":
        args["--model"] = tmp_path / "nope.safetensors"
    elif case == "misfit":
        args["--lora"] = _bad_lora(tmp_path / "misfit.safetensors", width=48)
    elif case == "not-adapter":
        args["--lora"] = base_file
    elif case == "out-is-folder":
        out.mkdir()
    elif case == "out-is-model":
        args["--out"] = base_file
    elif case == "suffix":
        args["--out"] = tmp_path / "out.ckpt"
    elif case == "diffusers-suffix":
        extra = ["--diffusers"]
    else:  # a delta of 300 * 300 * 4 per element overflows fp16 (65504)
        args["--lora"] = _bad_lora(tmp_path / "huge.safetensors", scale=300.0)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, stdout, stderr = merge_cli(capsys, *[x for kv in args.items() for x in kv], *extra)
    assert code == 2
    assert stderr.strip().splitlines()[-1].startswith("error: ")
    assert expected in stderr
    assert "wrote:" not in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_help_names_the_verb():
    from trainer.cli import build_parser

    text = build_parser().format_help()
    assert "merge-into" in text
