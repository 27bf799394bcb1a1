"""`python -m networks resize`: the written file's deltas are the SVD
truncations of the input's (Eckart-Young), read back by the real loader."""

from __future__ import annotations

import json
import math

import pytest
import safetensors.torch
import torch

from networks.__main__ import main
from networks.export import export_network, load_network
from networks.hashes import model_hash, tensor_data
from networks.inspect import inspect_file
from networks.kohya_file import read_network_file
from networks.lowrank import dynamic_rank
from networks.metadata import ExportInfo
from networks.network import AdapterNetwork, NetworkSpec
from networks.resize import RankRule, fold_alpha, resize_file
from tests.sd_fixtures import file_deltas, randomize

SPECS = {
    "locon": NetworkSpec("locon", rank=4, alpha=2, conv_rank=4, conv_alpha=1),
    "loha": NetworkSpec("loha", rank=2, alpha=2, conv_rank=2, conv_alpha=1),
    "lokr": NetworkSpec("lokr", rank=2, alpha=2, conv_rank=2, conv_alpha=1,
                        options={"decompose_both": True}),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@torch.no_grad()
def decay_ranks(network: AdapterNetwork) -> None:
    """Rank channels of falling size, faster in some modules than in others,
    so that the dynamic rules have spectra to choose from."""
    for index, adapter in enumerate(network.adapters):
        down = adapter.lora_down.weight
        decay = 0.15 + 0.7 * (index % 5) / 4
        steps = torch.tensor([decay ** i for i in range(down.shape[0])])
        down.mul_(steps.view(-1, *[1] * (down.dim() - 1)))


@pytest.fixture(scope="module")
def files(tmp_path_factory, demo_sd):
    folder = tmp_path_factory.mktemp("resize")
    paths = {}
    for seed, (name, spec) in enumerate(SPECS.items(), 1):
        network = AdapterNetwork.create(spec, demo_sd.unet, demo_sd.text_encoder)
        randomize(network, seed=seed)
        if name == "locon":
            decay_ranks(network)
        paths[name] = folder / f"{name}.safetensors"
        export_network(network, paths[name], ExportInfo(title=f"my {name}"), "fp32")
    return paths


@pytest.fixture(scope="module")
def originals(files, demo_sd):
    return {kind: file_deltas(path, demo_sd) for kind, path in files.items()}


def flat_svdvals(delta: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(delta.reshape(delta.shape[0], -1).double())


@pytest.mark.parametrize("kind", ["locon", "loha"])
def test_resize_to_the_deltas_own_rank_is_exact(files, originals, demo_sd, tmp_path, kind):
    # a rank-2 LoHa delta (a Hadamard product of two rank-2 matrices) has rank <= 4
    out = tmp_path / "same.safetensors"
    result = resize_file(files[kind], out, RankRule(rank=4), progress=False)
    before, after = originals[kind], file_deltas(out, demo_sd)
    assert before.keys() == after.keys() and len(before) == len(result.modules)
    for name, delta in before.items():
        torch.testing.assert_close(after[name], delta, rtol=1e-5, atol=1e-6)
    assert result.summary["min_kept_fraction"] == pytest.approx(1.0, abs=1e-5)
    tensors, _ = read_network_file(out)
    assert not any(k.split(".", 1)[1].startswith(("hada_", "lokr_")) for k in tensors)
    assert result.summary["converted_to_lora"] == (len(before) if kind == "loha" else 0)


@pytest.mark.parametrize("kind", ["locon", "loha", "lokr"])
def test_lower_rank_discards_exactly_the_smaller_singular_values(files, originals, demo_sd,
                                                                 tmp_path, kind):
    out = tmp_path / "low.safetensors"
    result = resize_file(files[kind], out, RankRule(rank=2, conv_rank=1), progress=False)
    before, after = originals[kind], file_deltas(out, demo_sd)
    tensors, _ = read_network_file(out)
    by_name = {m.name: m for m in result.modules}
    conv = 0
    for name, delta in before.items():
        kxk = delta.dim() == 4 and delta.shape[2:] != (1, 1)
        conv += kxk
        rank = 1 if kxk else 2
        s = flat_svdvals(delta)
        error = float(torch.linalg.norm((after[name] - delta).double()))
        assert error == pytest.approx(float(s[rank:].pow(2).sum().sqrt()), rel=1e-3, abs=1e-6)
        kept = math.sqrt(float(s[:rank].pow(2).sum() / s.pow(2).sum()))
        assert by_name[name].kept_fraction == pytest.approx(kept, rel=1e-4)
        assert by_name[name].new_rank == rank
        down = tensors[f"{name}.lora_down.weight"]
        assert down.shape[0] == rank
        if kxk:  # LoCon layout: a k x k down, a 1x1 up
            assert down.shape[1:] == delta.shape[1:]
            assert tensors[f"{name}.lora_up.weight"].shape == (delta.shape[0], rank, 1, 1)
    assert conv > 0


@pytest.mark.parametrize(("method", "value", "cap"), [
    ("sv_ratio", 3.0, 3), ("sv_cumulative", 0.8, 3), ("sv_fro", 0.9, 3),
    ("sv_fro", 0.99, None)])  # no --rank: capped by the module's own rank, 4
def test_dynamic_ranks_are_kohyas_rule(files, originals, demo_sd, tmp_path, method, value,
                                       cap):
    out = tmp_path / "dynamic.safetensors"
    result = resize_file(files["locon"], out, RankRule(rank=cap, method=method, value=value),
                         progress=False)
    before = originals["locon"]
    ranks = {m.name: m.new_rank for m in result.modules}
    for name, delta in before.items():
        expected = dynamic_rank(flat_svdvals(delta), method, value, cap or 4)
        assert ranks[name] == expected, name
    assert len(set(ranks.values())) > 1  # the rule did pick per module
    _, meta = read_network_file(out)
    assert meta["ss_network_dim"] == meta["ss_network_alpha"] == "Dynamic"
    network = load_network(out, demo_sd.unet, demo_sd.text_encoder)  # "Dynamic" parses
    assert network.spec.algorithm == "locon"
    assert {a.lora_name: a.rank for a in network.adapters} == ranks


def test_alpha_keeps_the_ratio_unless_the_file_type_cannot_hold_it():
    up, down = torch.randn(8, 2), torch.randn(2, 5)
    kept = fold_alpha(up, down, 0.5, 2, "fp16")  # alpha 1.0: exact in fp16
    assert float(kept["alpha"]) == 1.0 and torch.equal(kept["lora_up.weight"], up)
    folded = fold_alpha(up, down, 1 / 3, 2, "fp16")  # 2/3 is not an fp16 number
    assert float(folded["alpha"]) == 2.0  # scale 1, the 1/3 carried by the factors
    torch.testing.assert_close(folded["lora_up.weight"] @ folded["lora_down.weight"],
                               (up @ down) / 3)
    negative = fold_alpha(up, down, -1 / 3, 2, "fp32")
    torch.testing.assert_close(negative["lora_up.weight"] @ negative["lora_down.weight"],
                               -(up @ down) / 3)


def test_output_inspects_clean_and_carries_the_metadata(files, tmp_path):
    out = tmp_path / "r.safetensors"
    resize_file(files["locon"], out, RankRule(rank=2), precision="fp16", progress=False)
    report = inspect_file(str(out))
    assert report.problems == []
    assert set(report.dtypes) == {"float16"}
    _, source = read_network_file(files["locon"])
    _, meta = read_network_file(out)
    assert meta["modelspec.title"] == "my locon"
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "1"  # alpha/rank 1/2
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"]) == {"algo": "locon", "conv_dim": "2",
                                                   "conv_alpha": "0.5"}  # conv 1/4 kept
    assert meta["sshs_model_hash"] == model_hash(tensor_data(out.read_bytes()))
    assert meta["sshs_model_hash"] != source["sshs_model_hash"]
    assert json.loads(meta["ss_lora_tools"])[-1]["tool"] == "resize"
    assert meta["ss_training_comment"].startswith("dimension is resized from 4 to 2")


def test_cli_json_report(files, tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    assert main(["resize", str(files["locon"]), "--rank", "3", "--out", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["out"] == str(out) and out.is_file()
    assert {"name", "old_rank", "new_rank", "kept_fraction"} <= set(report["modules"][0])
    assert {m["new_rank"] for m in report["modules"]} == {3}
    assert report["summary"]["size_after"] == out.stat().st_size
    assert report["summary"]["size_after"] < report["summary"]["size_before"]
    assert f"progress: {len(report['modules'])}/{len(report['modules'])}" in captured.err


def _error(argv, capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_errors_are_one_paragraph(files, tmp_path, capsys):
    src = str(files["locon"])
    out = str(tmp_path / "o.safetensors")
    assert "does not exist" in _error(["resize", str(tmp_path / "no.safetensors"), "--rank",
                                       "2", "--out", out], capsys)
    assert "is an input file" in _error(["resize", src, "--rank", "2", "--out", src], capsys)
    assert "must end in .safetensors" in _error(["resize", src, "--rank", "2", "--out",
                                                 str(tmp_path / "o.pt")], capsys)
    assert "needs --rank" in _error(["resize", src, "--out", out], capsys)
    assert "needs --value" in _error(["resize", src, "--dynamic", "sv_fro", "--out", out],
                                     capsys)
    assert "in (0, 1]" in _error(["resize", src, "--dynamic", "sv_fro", "--value", "2",
                                  "--out", out], capsys)
    checkpoint = tmp_path / "model.safetensors"
    safetensors.torch.save_file({"model.diffusion_model.weight": torch.zeros(3)}, checkpoint)
    assert "not an adapter" in _error(["resize", str(checkpoint), "--rank", "2", "--out", out],
                                      capsys)
    assert not (tmp_path / "o.safetensors").exists()


def test_dora_file_is_refused(demo_sd, tmp_path, capsys):
    spec = NetworkSpec("lora", rank=2, alpha=2, dora=True, train_unet=False)
    network = AdapterNetwork.create(spec, demo_sd.unet, demo_sd.text_encoder)
    path = tmp_path / "dora.safetensors"
    export_network(network, path, ExportInfo(), "fp32")
    message = _error(["resize", str(path), "--rank", "1", "--out",
                      str(tmp_path / "o.safetensors")], capsys)
    assert "DoRA" in message and "merge-into" in message
