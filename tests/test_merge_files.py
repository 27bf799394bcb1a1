"""`python -m networks merge`: the merged file's deltas are the weighted sum of
the inputs' (exactly, or its best rank-N approximation), read back by the loader."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from networks.__main__ import main
from networks.export import export_network, load_network
from networks.inspect import inspect_file
from networks.kohya_file import read_network_file
from networks.merge_files import MergePlan, merge_files, parse_source
from networks.metadata import ExportInfo
from networks.network import AdapterNetwork, NetworkSpec
from tests.sd_fixtures import file_deltas, randomize

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPECS = {
    # LoCon on every layer; plain LoRA at another rank and alpha (no conv modules)
    "locon": NetworkSpec("locon", rank=4, alpha=2, conv_rank=3, conv_alpha=1),
    "lora": NetworkSpec("lora", rank=2, alpha=1),
    "loha": NetworkSpec("loha", rank=2, alpha=2, conv_rank=2, conv_alpha=1),
    "loha-tucker": NetworkSpec("loha", rank=2, alpha=2, conv_rank=2, conv_alpha=1,
                               tucker=True),
    "loha-unet": NetworkSpec("loha", rank=2, alpha=2, conv_rank=2, conv_alpha=1,
                             train_text_encoder=False),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory, demo_sd):
    folder = tmp_path_factory.mktemp("merge")
    paths = {}
    for seed, (name, spec) in enumerate(SPECS.items(), 11):
        network = AdapterNetwork.create(spec, demo_sd.unet, demo_sd.text_encoder)
        randomize(network, seed=seed)
        paths[name] = folder / f"{name}.safetensors"
        export_network(network, paths[name], ExportInfo(title=name), "fp32")
    return paths


@pytest.fixture(scope="module")
def originals(files, demo_sd):
    return {kind: file_deltas(path, demo_sd) for kind, path in files.items()}


def weighted_sum(parts) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for module_deltas, weight in parts:
        for name, delta in module_deltas.items():
            total[name] = total.get(name, 0) + weight * delta
    return total


@pytest.mark.parametrize("weights", [(0.7, 0.3), (1.0, -0.5)])
def test_exact_merge_is_the_weighted_sum(files, originals, demo_sd, tmp_path, weights):
    out = tmp_path / "merged.safetensors"
    result = merge_files([(files["locon"], weights[0]), (files["lora"], weights[1])], out,
                         progress=False)
    expected = weighted_sum([(originals["locon"], weights[0]), (originals["lora"], weights[1])])
    merged = file_deltas(out, demo_sd)
    assert merged.keys() == expected.keys()
    for name, delta in expected.items():
        torch.testing.assert_close(merged[name], delta, rtol=1e-5, atol=1e-6)
    modes = {m.name: (m.mode, m.rank) for m in result.modules}
    shared = set(originals["lora"])
    assert all(modes[n] == ("concat", 6) for n in shared)  # ranks 4 + 2 side by side
    only_locon = set(originals["locon"]) - shared  # the conv layers
    assert only_locon and all(modes[n][0] == "kept" for n in only_locon)
    assert inspect_file(str(out)).problems == []


def test_a_lone_loha_module_is_kept_with_its_weight(files, originals, demo_sd, tmp_path):
    out = tmp_path / "kept.safetensors"
    lora_te = {n: d for n, d in originals["lora"].items() if n.startswith("lora_te_")}
    te_only = tmp_path / "te.safetensors"
    tensors, meta = read_network_file(files["lora"])
    safetensors.torch.save_file({k: v for k, v in tensors.items() if k.startswith("lora_te_")},
                                te_only, meta)
    result = merge_files([(files["loha-unet"], 0.5), (te_only, 2.0)], out, progress=False)
    merged = file_deltas(out, demo_sd)
    expected = weighted_sum([(originals["loha-unet"], 0.5), (lora_te, 2.0)])
    assert merged.keys() == expected.keys()
    for name, delta in expected.items():
        torch.testing.assert_close(merged[name], delta, rtol=1e-5, atol=1e-6)
    written, out_meta = read_network_file(out)
    assert any(k.endswith("hada_w1_a") for k in written)
    assert {m.mode for m in result.modules} == {"kept"}
    assert out_meta["ss_network_module"] == "lycoris.kohya"


# LoHa's face-split factors give the SVD without the full delta; Tucker cores
# (on the convs) need the full delta's SVD.
@pytest.mark.parametrize("first", ["loha", "loha-tucker"])
def test_svd_merge_is_the_best_rank_n_approximation(files, originals, demo_sd, tmp_path,
                                                    first):
    out = tmp_path / "svd.safetensors"
    result = merge_files([(files[first], 0.6), (files["locon"], 0.4)], out,
                         MergePlan(rank=2), progress=False)
    expected = weighted_sum([(originals[first], 0.6), (originals["locon"], 0.4)])
    merged = file_deltas(out, demo_sd)
    kept = {m.name: m.kept_fraction for m in result.modules}
    assert {m.mode for m in result.modules} == {"svd"}
    for name, delta in expected.items():
        s = torch.linalg.svdvals(delta.reshape(delta.shape[0], -1).double())
        error = float(torch.linalg.norm((merged[name] - delta).double()))
        assert error == pytest.approx(float(s[2:].pow(2).sum().sqrt()), rel=1e-3, abs=1e-6)
        assert kept[name] == pytest.approx(float((s[:2].pow(2).sum() / s.pow(2).sum()).sqrt()),
                                           rel=1e-4)
    network = load_network(out, demo_sd.unet, demo_sd.text_encoder)
    assert {a.rank for a in network.adapters} == {2}
    assert inspect_file(str(out)).problems == []
    _, meta = read_network_file(out)
    assert meta["modelspec.title"] == first  # the first input's header
    assert meta["ss_network_dim"] == "2"
    detail = json.loads(meta["ss_lora_tools"])[-1]["detail"]
    assert f"{first}.safetensors x0.6" in detail and "locon.safetensors x0.4" in detail


def test_lora_svd_merge_from_factors_matches_the_full_svd(files, originals, demo_sd, tmp_path):
    out = tmp_path / "svd-lora.safetensors"
    merge_files([(files["locon"], 0.5), (files["lora"], 0.5)], out, MergePlan(rank=3),
                progress=False)
    expected = weighted_sum([(originals["locon"], 0.5), (originals["lora"], 0.5)])
    merged = file_deltas(out, demo_sd)
    for name, delta in expected.items():
        rank = min(3, *delta.reshape(delta.shape[0], -1).shape)
        s = torch.linalg.svdvals(delta.reshape(delta.shape[0], -1).double())
        error = float(torch.linalg.norm((merged[name] - delta).double()))
        assert error == pytest.approx(float(s[rank:].pow(2).sum().sqrt()), rel=1e-3, abs=1e-6)


def test_a_1x1_conv_stored_flat_merges_with_its_4d_form(files, originals, demo_sd, tmp_path):
    """Some tools store a 1x1 conv's factors 2-D: the same layer as (r, in, 1, 1)."""
    tensors, meta = read_network_file(files["lora"])
    flat = {k: v.flatten(1) if ("proj_in" in k and v.dim() == 4) else v
            for k, v in tensors.items()}
    assert any(v.dim() == 2 for k, v in flat.items() if "proj_in" in k)
    flat_path = tmp_path / "flat.safetensors"
    safetensors.torch.save_file(flat, flat_path, meta)
    out = tmp_path / "mixed.safetensors"
    merge_files([(flat_path, 1.0), (files["lora"], 0.5)], out, progress=False)
    merged = file_deltas(out, demo_sd)
    for name, delta in originals["lora"].items():
        torch.testing.assert_close(merged[name], 1.5 * delta, rtol=1e-5, atol=1e-6)
    written, _ = read_network_file(out)
    assert all(v.dim() == 4 for k, v in written.items() if "proj_in.lora_" in k)


def test_parse_source():
    assert parse_source("a.safetensors:0.7") == ("a.safetensors", 0.7)
    assert parse_source("a.safetensors:-1e-1") == ("a.safetensors", -0.1)
    assert parse_source("a.safetensors") == ("a.safetensors", 1.0)
    assert parse_source(r"C:\loras\a.safetensors") == (r"C:\loras\a.safetensors", 1.0)
    assert parse_source(r"C:\loras\a.safetensors:2") == (r"C:\loras\a.safetensors", 2.0)


def _error(argv, capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_errors(files, tmp_path, capsys):
    out = str(tmp_path / "o.safetensors")
    locon, lora, loha = (str(files[k]) for k in ("locon", "lora", "loha"))
    assert "is not a number" in _error(["merge", f"{locon}:abc", lora, "--out", out], capsys)
    assert "finite" in _error(["merge", f"{locon}:nan", lora, "--out", out], capsys)
    assert "at least two" in _error(["merge", locon, "--out", out], capsys)
    message = _error(["merge", loha, locon, "--out", out], capsys)
    assert "no exact LoRA form" in message and "--rank" in message
    assert "is an input file" in _error(["merge", locon, lora, "--out", lora], capsys)
    tensors, meta = read_network_file(files["lora"])
    key = next(k for k in tensors if k.endswith("lora_down.weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 1)
    other = tmp_path / "other-model.safetensors"
    safetensors.torch.save_file(tensors, other, meta)
    message = _error(["merge", locon, str(other), "--out", out], capsys)
    assert "different layer shapes" in message and key.split(".")[0] in message
    assert not (tmp_path / "o.safetensors").exists()


def test_tensors_of_no_adapter_module_are_refused_not_dropped(files, originals, demo_sd,
                                                              tmp_path, capsys):
    """An embedding bundle in a LoRA file has no weighted sum: the merge says so and
    writes nothing; the copy its message suggests merges."""
    tensors, meta = read_network_file(files["lora"])
    tensors["bundle_emb.mychar.string_to_param.*"] = torch.randn(1, 32)
    bundled = tmp_path / "bundled.safetensors"
    safetensors.torch.save_file(tensors, bundled, meta)
    out = tmp_path / "o.safetensors"
    message = _error(["merge", str(files["locon"]), str(bundled), "--out", str(out)], capsys)
    assert "bundle_emb.mychar.string_to_param.*" in message and "--drop-unknown" in message
    assert not out.exists()
    copy = tmp_path / "copy.safetensors"
    assert main(["convert", str(bundled), "--out", str(copy), "--drop-unknown"]) == 0
    assert "bundle_emb" in capsys.readouterr().out
    merge_files([(files["locon"], 1.0), (copy, 1.0)], out, progress=False)
    expected = weighted_sum([(originals["locon"], 1.0), (originals["lora"], 1.0)])
    merged = file_deltas(out, demo_sd)
    assert merged.keys() == expected.keys()
    for name, delta in expected.items():
        torch.testing.assert_close(merged[name], delta, rtol=1e-5, atol=1e-6)


def test_cli_json(files, tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    assert main(["merge", f"{files['locon']}:0.7", f"{files['lora']}:0.3", "--out", str(out),
                 "--precision", "fp16", "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["out"] == str(out)
    assert [i["weight"] for i in report["summary"]["inputs"]] == [0.7, 0.3]
    assert report["summary"]["modes"].keys() == {"concat", "kept"}
    assert set(inspect_file(str(out)).dtypes) == {"float16"}
    assert "progress: " in captured.err
