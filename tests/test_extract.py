"""`python -m trainer extract`: from a base and the base plus known low-rank
deltas, the extracted file holds those deltas and makes the base compute the
tuned model."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from networks.export import load_network
from networks.file_header import read_header
from networks.targets import all_layers_by_name
from tests.sd_fixtures import fixed_inputs, run
from trainer.cli import main
from trainer.demo_model import single_file_state_dict
from trainer.model_loading import load_sd_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DELTA_RANK = 2
ATTENTION = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
PROJ_IN = "lora_unet_mid_block_attentions_0_proj_in"  # a 1x1 conv
CONV = "lora_unet_up_blocks_1_resnets_0_conv1"  # 3x3: LoCon only
TEXT = "lora_te_text_model_encoder_layers_3_mlp_fc1"
CHANGED = (ATTENTION, PROJ_IN, CONV, TEXT)


def rank_r_delta(shape, seed: int, size: float = 0.1, rank: int = DELTA_RANK) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    flat_in = int(torch.tensor(shape[1:]).prod())
    up = torch.randn(shape[0], rank, generator=generator) * size
    down = torch.randn(rank, flat_in, generator=generator) * size
    return (up @ down).reshape(shape)


def write_tuned(base, path, sizes: dict[str, float]) -> dict[str, torch.Tensor]:
    """The base with a rank-2 delta added to each named layer, as a single file."""
    tuned = copy.deepcopy(base)
    layers = all_layers_by_name(tuned.unet, tuned.text_encoder)
    deltas = {}
    with torch.no_grad():
        for seed, (name, size) in enumerate(sizes.items()):
            deltas[name] = rank_r_delta(layers[name].weight.shape, seed, size)
            layers[name].weight += deltas[name]
    parts = {"unet": tuned.unet, "vae": tuned.vae, "text_encoder": tuned.text_encoder}
    save_file(single_file_state_dict(parts), str(path))
    return deltas


@pytest.fixture(scope="module")
def base(demo_model_dir):
    return load_sd_model(demo_model_dir / "diffusers")


@pytest.fixture(scope="module")
def tuned(base, tmp_path_factory):
    path = tmp_path_factory.mktemp("tuned") / "tuned.safetensors"
    return path, write_tuned(base, path, {name: 0.1 for name in CHANGED})


def extract_cli(capsys, *args) -> tuple[int, str, str]:
    code = main(["extract", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_extracted_lora_holds_the_deltas_and_makes_the_base_compute_the_tuned_model(
    base, demo_model_dir, tuned, tmp_path, capsys
):
    tuned_file, deltas = tuned
    out = tmp_path / "extracted.safetensors"
    code, stdout, stderr = extract_cli(capsys, "--base", demo_model_dir / "diffusers", "--tuned",
                                       tuned_file, "--rank", DELTA_RANK, "--out", out,
                                       "--precision", "fp32")
    assert code == 0, stderr
    lines = stdout.strip().splitlines()
    assert lines[-1] == f"wrote: {out}"
    assert "progress: " in stderr

    # The unchanged layers, and the 3x3 conv without --conv-rank, are left out.
    modules = {key.split(".")[0] for key in load_file(out)}
    assert modules == {ATTENTION, PROJ_IN, TEXT}
    sd = copy.deepcopy(base)
    network = load_network(out, sd.unet, sd.text_encoder)
    for adapter in network.adapters:
        delta = deltas[adapter.lora_name]
        assert adapter.rank == DELTA_RANK and float(adapter.alpha) == DELTA_RANK
        torch.testing.assert_close(adapter.scaled_delta(), delta, rtol=1e-4,
                                   atol=1e-5 * float(delta.abs().max()))
    assert any(f"{ATTENTION}  rank 2  relative error 0.0000" == line for line in lines)

    # Applied to the base, it computes the tuned model (the conv delta aside).
    expected = load_sd_model(tuned_file)
    with torch.no_grad():
        all_layers_by_name(expected.unet, None)[CONV].weight -= deltas[CONV]
    inputs = fixed_inputs(base)
    network.attach()
    network.eval()
    got = run(sd.text_encoder, sd.unet, inputs)
    want = run(expected.text_encoder, expected.unet, inputs)
    torch.testing.assert_close(got.noise, want.noise, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.text, want.text, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(want.noise, run(base.text_encoder, base.unet, inputs).noise,
                              atol=1e-3)

    meta = read_header(out).metadata
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("2", "2")
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_extracted_from_tuned"] == "tuned.safetensors"
    assert meta["ss_extracted_from_base"] == "diffusers"
    assert [step["tool"] for step in json.loads(meta["ss_lora_tools"])] == ["extract"]


def test_conv_rank_extracts_the_3x3_conv_delta_as_locon(
    base, demo_model_dir, tuned, tmp_path, capsys
):
    tuned_file, deltas = tuned
    out = tmp_path / "locon.safetensors"
    code, _, stderr = extract_cli(capsys, "--base", demo_model_dir / "demo-sd15.safetensors",
                                  "--tuned", tuned_file, "--rank", 4, "--conv-rank", DELTA_RANK,
                                  "--out", out, "--precision", "fp32")
    assert code == 0, stderr
    tensors = load_file(out)
    assert {key.split(".")[0] for key in tensors} == set(CHANGED)
    conv_layer = all_layers_by_name(base.unet, None)[CONV]
    out_dim, in_dim = conv_layer.weight.shape[:2]
    assert tensors[f"{CONV}.lora_down.weight"].shape == (DELTA_RANK, in_dim, 3, 3)
    assert tensors[f"{CONV}.lora_up.weight"].shape == (out_dim, DELTA_RANK, 1, 1)
    sd = copy.deepcopy(base)
    network = load_network(out, sd.unet, sd.text_encoder)
    for adapter in network.adapters:
        delta = deltas[adapter.lora_name]
        torch.testing.assert_close(adapter.scaled_delta(), delta, rtol=1e-4,
                                   atol=1e-5 * float(delta.abs().max()))
    meta = read_header(out).metadata
    assert json.loads(meta["ss_network_args"])["conv_dim"] == str(DELTA_RANK)


def test_a_lower_rank_reports_the_discarded_part_and_a_quiet_text_encoder_is_left_out(
    base, demo_model_dir, tmp_path, capsys
):
    tuned_file = tmp_path / "unet-tuned.safetensors"
    # The text encoder moves by at most ~0.005 < 0.01: kohya calls it unchanged.
    deltas = write_tuned(base, tuned_file, {ATTENTION: 0.1, TEXT: 0.01})
    assert float(deltas[TEXT].abs().max()) < 0.01
    out = tmp_path / "rank1.safetensors"
    code, stdout, stderr = extract_cli(capsys, "--base", demo_model_dir / "diffusers", "--tuned",
                                       tuned_file, "--rank", 1, "--out", out, "--json")
    assert code == 0, stderr
    report_line, wrote = stdout.strip().splitlines()
    assert wrote == f"wrote: {out}"
    report = json.loads(report_line)
    assert [m["name"] for m in report["modules"]] == [ATTENTION]
    assert report["text_encoder"]["extracted"] is False
    assert 0 < report["text_encoder"]["max_abs_diff"] < 0.01

    s = torch.linalg.svdvals(deltas[ATTENTION].double())
    expected_error = float(s[1] / s[:2].norm())  # rank 1 of a rank-2 delta
    assert report["modules"][0]["relative_error"] == pytest.approx(expected_error, rel=1e-4)
    assert read_header(out).tensors[f"{ATTENTION}.lora_up.weight"].dtype == "F16"  # the default


def _other_architecture(path):
    """The demo model with a narrower text-encoder MLP (fc1/fc2 shapes differ)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from trainer.demo_model import build_demo_components

    parts = build_demo_components()
    config = CLIPTextConfig(**{**parts["text_encoder"].config.to_dict(), "intermediate_size": 64})
    parts["text_encoder"] = CLIPTextModel(config).eval()
    save_file(single_file_state_dict(parts), str(path))
    return path


@pytest.mark.parametrize("case", ["architecture", "missing", "suffix", "out-is-input", "same",
                                  "rank"])
def test_mistakes_are_one_error_paragraph(case, demo_model_dir, tuned, tmp_path, capsys):
    base_file = demo_model_dir / "demo-sd15.safetensors"
    args = {"--base": base_file, "--tuned": tuned[0], "--rank": 2,
            "--out": tmp_path / "x.safetensors"}
    expected = {"architecture": "different architectures", "missing": "does not exist",
                "suffix": "as .safetensors", "out-is-input": "is one of the inputs",
                "same": "the same model", "rank": "at least 1"}[case]
    if case == "architecture":
        args["--tuned"] = _other_architecture(tmp_path / "other.safetensors")
    elif case == "missing":
        args["--tuned"] = tmp_path / "nope.safetensors"
    elif case == "suffix":
        args["--out"] = tmp_path / "x.pt"
    elif case == "out-is-input":
        args["--out"] = tuned[0]
    elif case == "same":
        args["--tuned"] = base_file
    else:
        args["--rank"] = 0
    code, stdout, stderr = extract_cli(capsys, *[x for kv in args.items() for x in kv])
    assert code == 2
    assert stderr.strip().splitlines()[-1].startswith("error: ") and expected in stderr
    assert "wrote:" not in stdout and not (tmp_path / "x.safetensors").exists()
    if case == "architecture":
        assert "lora_te_text_model_encoder_layers_0_mlp_fc1" in stderr


def test_extracting_a_merged_lora_gives_the_lora_back(base, demo_model_dir, tmp_path, capsys):
    """merge-into then extract at the LoRA's rank: two tools, one delta."""
    from networks.export import export_network
    from networks.metadata import ExportInfo
    from networks.network import AdapterNetwork, NetworkSpec
    from tests.sd_fixtures import randomize

    sd = copy.deepcopy(base)
    lora = AdapterNetwork.create(NetworkSpec("lora", rank=4, alpha=2), sd.unet, sd.text_encoder)
    randomize(lora)
    lora_file = tmp_path / "lora.safetensors"
    export_network(lora, lora_file, ExportInfo(), "fp32")
    base_file = demo_model_dir / "demo-sd15.safetensors"
    merged = tmp_path / "merged.safetensors"
    assert main(["merge-into", "--model", str(base_file), "--lora", str(lora_file), "--out",
                 str(merged), "--precision", "fp32"]) == 0
    out = tmp_path / "back.safetensors"
    code, _, stderr = extract_cli(capsys, "--base", base_file, "--tuned", merged, "--rank", 4,
                                  "--out", out, "--precision", "fp32")
    assert code == 0, stderr
    original = {a.lora_name: a.scaled_delta() for a in lora.adapters}
    back = load_network(out, copy.deepcopy(base).unet, copy.deepcopy(base).text_encoder)
    assert {a.lora_name for a in back.adapters} == set(original)
    for adapter in back.adapters:
        delta = original[adapter.lora_name]
        torch.testing.assert_close(adapter.scaled_delta(), delta, rtol=1e-4,
                                   atol=1e-4 * float(delta.abs().max()))
