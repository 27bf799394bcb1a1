"""`merge_adapters` (trainer/merge.py) and `python -m trainer sample`
(trainer/sample_cli.py): merged weights against the hook route and the
formula, the PNG the CLI writes, and its argument errors."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from core.errors import UserError
from networks.export import export_network, load_network
from networks.metadata import ExportInfo
from networks.network import AdapterNetwork, NetworkSpec
from tests.sd_fixtures import assert_outputs_close, fixed_inputs, randomize, run
from trainer.cli import main
from trainer.merge import merge_adapters

REPO = Path(__file__).resolve().parents[1]
SPECS = {
    "style_a": NetworkSpec("lora", rank=4, alpha=2),  # U-Net and text encoder
    "style_b": NetworkSpec("locon", rank=4, alpha=4, conv_rank=4, conv_alpha=2),
    "lcm": NetworkSpec("locon", rank=4, alpha=4, conv_rank=4, conv_alpha=4,
                       train_text_encoder=False),
}  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory, demo_sd) -> dict[str, Path]:
    """Adapter files with random (non-zero) weights, plus one that does not fit."""
    folder = tmp_path_factory.mktemp("adapters")
    paths = {}
    for seed, (name, spec) in enumerate(SPECS.items()):
        # create() only reads the layers' shapes; nothing is attached.
        network = AdapterNetwork.create(spec, demo_sd.unet, demo_sd.text_encoder)
        randomize(network, seed=seed + 1)
        paths[name] = folder / f"{name}.safetensors"
        export_network(network, paths[name], ExportInfo())
    # A different width on one layer, as from a model of another family.
    tensors = load_file(paths["style_a"])
    key = next(k for k in tensors if k.endswith("to_k.lora_down.weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 8)
    paths["misfit"] = folder / "misfit.safetensors"
    save_file(tensors, paths["misfit"])
    return paths


@pytest.fixture
def sd(demo_sd):
    return copy.deepcopy(demo_sd)


def weights(sd) -> dict[str, torch.Tensor]:
    return {
        **{f"unet.{k}": v.clone() for k, v in sd.unet.state_dict().items()},
        **{f"te.{k}": v.clone() for k, v in sd.text_encoder.state_dict().items()},
    }


def test_weight_zero_merges_to_exactly_the_base(sd, demo_sd, files):
    merge_adapters(sd, [(files["style_a"], 0.0)])
    base = weights(demo_sd)
    assert all(torch.equal(v, base[k]) for k, v in weights(sd).items())
    inputs = fixed_inputs(demo_sd)
    merged, expected = (
        run(sd.text_encoder, sd.unet, inputs),
        run(demo_sd.text_encoder, demo_sd.unet, inputs),
    )
    assert torch.equal(merged.noise, expected.noise) and torch.equal(merged.text, expected.text)


def test_two_files_add_their_weighted_deltas(sd, demo_sd, files):
    plan = [(files["style_a"], 0.8), (files["style_b"], -0.5)]
    reference = copy.deepcopy(demo_sd)
    hooked = []
    for path, weight in plan:
        network = load_network(path, reference.unet, reference.text_encoder)
        network.set_multiplier(weight)
        hooked.append(network.attach())

    merge_adapters(sd, plan)

    # Weights: W + 0.8 dW_a - 0.5 dW_b on every targeted layer, others untouched.
    expected = weights(demo_sd)
    for network in hooked:
        for adapter in network.adapters:
            name = _weight_name(reference, adapter.base)
            expected[name] = expected[name] + adapter.scaled_delta()
    actual, base = weights(sd), weights(demo_sd)
    changed = [k for k in actual if not torch.equal(actual[k], base[k])]
    assert len(changed) == len({a.lora_name for n in hooked for a in n.adapters})
    for key, value in actual.items():
        torch.testing.assert_close(value, expected[key], rtol=1e-6, atol=1e-7)

    # Outputs: merged weights compute what the two attached networks compute.
    inputs = fixed_inputs(demo_sd)
    adapted = run(reference.text_encoder, reference.unet, inputs)
    base_out = run(demo_sd.text_encoder, demo_sd.unet, inputs)
    assert (adapted.noise - base_out.noise).abs().max() > 1e-3, "the files must do something"
    assert_outputs_close(run(sd.text_encoder, sd.unet, inputs), adapted)
    # No hooks stay behind on the merged model.
    assert not any(m._forward_hooks for m in [*sd.unet.modules(), *sd.text_encoder.modules()])


def _weight_name(sd, layer) -> str:
    for prefix, model in (("unet", sd.unet), ("te", sd.text_encoder)):
        for name, module in model.named_modules():
            if module is layer:
                return f"{prefix}.{name}.weight"
    raise AssertionError("layer not found")


def test_a_file_that_does_not_fit_is_refused_and_changes_nothing(sd, demo_sd, files):
    with pytest.raises(UserError, match="misfit.safetensors does not fit this base model"):
        merge_adapters(sd, [(files["style_a"], 1.0), (files["misfit"], 1.0)])
    base = weights(demo_sd)
    assert all(torch.equal(v, base[k]) for k, v in weights(sd).items())


def test_cli_writes_the_png_it_was_asked_for(tmp_path, demo_model_dir, files):
    out = tmp_path / "preview.png"
    command = [
        sys.executable, "-m", "trainer", "sample",
        "--model", str(demo_model_dir / "diffusers"),
        "--lora", f"{files['style_a']}:0.8", "--prompt", "a red circle",
        "--steps", "2", "--size", "64x48", "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "euler_a, 2 steps, guidance 7" in result.stdout
    with Image.open(out) as image:
        assert (image.format, image.size) == ("PNG", (64, 48))
    assert os.listdir(tmp_path) == ["preview.png"], "no temporary file may stay behind"


def test_cli_lcm_lora_samples_4_lcm_steps(tmp_path, demo_model_dir, files, monkeypatch, capsys):
    import trainer.sampling

    made = []
    original = trainer.sampling.make_scheduler
    monkeypatch.setattr(
        trainer.sampling, "make_scheduler", lambda *a: made.append(original(*a)) or made[-1]
    )
    out = tmp_path / "lcm.png"
    argv = [
        "sample", "--model", str(demo_model_dir / "demo-sd15.safetensors"),
        "--lora", f"{files['style_a']}:0.8", "--lcm-lora", str(files["lcm"]),
        "--prompt", "a red circle", "--size", "64x64", "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    assert "(64x64, lcm, 4 steps, guidance 1," in capsys.readouterr().out
    assert type(made[0]).__name__ == "LCMScheduler"
    assert made[0].timesteps.tolist() == [999, 759, 499, 259]
    with Image.open(out) as image:
        assert image.size == (64, 64)


def test_demo_keyword_loads_the_demo_model(tmp_path, demo_model_dir, monkeypatch):
    import trainer.demo_assets

    monkeypatch.setattr(
        trainer.demo_assets, "ensure_demo_model", lambda: demo_model_dir / "diffusers"
    )
    argv = ["sample", "--model", "demo", "--prompt", "x", "--steps", "1", "--size", "64x64"]
    assert main([*argv, "--out", str(tmp_path / "demo.png")]) == 0


BAD_ARGUMENTS = {
    "missing model": (["--model", "{tmp}/nowhere"], "--model {tmp}/nowhere does not exist"),
    "missing lora": (["--lora", "{tmp}/no.safetensors"], "no.safetensors does not exist"),
    "weight not a number": (["--lora", "{style_a}:strong"], "'strong' after the last ':'"),
    "weight not finite": (["--lora", "{style_a}:inf"], "must be a finite number"),
    "size not WxH": (["--size", "512"], "--size '512' is not WxH"),
    "size not multiple of 8": (["--size", "500x512"], "positive multiples of 8"),
    "zero steps": (["--steps", "0"], "--steps 0: at least 1"),
    "too many LCM steps": (["--lcm-lora", "{lcm}", "--steps", "51"], "at most 50 steps"),
    "negative guidance": (["--guidance", "-1"], "--guidance -1.0: use a number >= 0"),
    "sampler with LCM": (["--lcm-lora", "{lcm}", "--sampler", "ddim"], "cannot be combined"),
    "clip skip 0": (["--clip-skip", "0"], "--clip-skip 0"),
    "clip skip too deep": (["--clip-skip", "13"], "has only 12 layers"),
    "out folder missing": (["--out", "{tmp}/nope/x.png"], "the folder {tmp}/nope does not exist"),
    "out not png": (["--out", "{tmp}/x.jpg"], "must be a .png file name"),
    "lora does not fit": (["--lora", "{misfit}:0.5"], "misfit.safetensors does not fit"),
}


@pytest.mark.parametrize("case", BAD_ARGUMENTS)
def test_bad_arguments_are_refused_clearly(case, tmp_path, demo_model_dir, files, capsys):
    extra, message = BAD_ARGUMENTS[case]
    names = {"tmp": tmp_path, **files}
    argv = ["sample", "--model", str(demo_model_dir / "diffusers"), "--prompt", "x",
            "--steps", "1", "--size", "64x64", "--out", str(tmp_path / "x.png")]  # fmt: skip
    argv += [arg.format(**names) for arg in extra]
    assert main(argv) == 2
    # The last line: in-process, the libraries' loading bars may come first.
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("error: ") and message.format(**names) in err
    assert not (tmp_path / "x.png").exists()


def test_unwritable_output_folder_is_refused(tmp_path, demo_model_dir, capsys):
    folder = tmp_path / "locked"
    folder.mkdir(mode=0o555)
    if os.access(folder, os.W_OK):  # root ignores permissions; sysfs refuses even root
        folder = Path("/sys")
    argv = ["sample", "--model", str(demo_model_dir / "diffusers"), "--prompt", "x",
            "--out", str(folder / "x.png")]  # fmt: skip
    assert main(argv) == 2
    assert f"cannot write in {folder}" in capsys.readouterr().err


def test_cli_error_has_no_traceback(tmp_path):
    command = [sys.executable, "-m", "trainer", "sample", "--model", str(tmp_path),
               "--prompt", "x", "--size", "64x60", "--out", str(tmp_path / "x.png")]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("error: --size 64x60") and "Traceback" not in result.stderr
