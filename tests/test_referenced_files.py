"""Files a config names but loads only later (network.resume_from,
sample.lcm_lora, the preview decoder's weights) are read before the model
loads: a wrong one stops the run with a message naming the setting and file,
before any step is trained."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save, save_file

from core.errors import UserError
from trainer import cli, train_setup
from trainer.config import load_config, require_paths

REPO = Path(__file__).resolve().parents[1]
NAME = "lora_unet_mid_block_attentions_0_proj_in"
ADAPTER = {f"{NAME}.lora_down.weight": torch.zeros(4, 8),
           f"{NAME}.lora_up.weight": torch.zeros(8, 4), f"{NAME}.alpha": torch.tensor(4.0)}
LOHA = {f"lora_te_text_model_encoder_layers_0_mlp_fc1.hada_w{i}_{s}": torch.zeros(4, 4)
        for i in (1, 2) for s in "ab"}


def write_kind(path: Path, kind: str) -> Path:
    if kind == "checkpoint":  # a model, as A1111 names its single-file checkpoints
        save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
                   "first_stage_model.decoder.conv_in.bias": torch.zeros(4)}, path)
    elif kind == "text":
        path.write_text("an LCM-LoRA? no, a caption\n")
    elif kind == "truncated":
        path.write_bytes(save(ADAPTER)[:-7])
    elif kind == "folder":
        path.mkdir()
    elif kind == "pickle":
        torch.save(ADAPTER, path)
    elif kind == "mixed":
        save_file({**ADAPTER, "model.diffusion_model.out.2.bias": torch.zeros(4)}, path)
    elif kind != "missing":
        save_file({"lora": ADAPTER, "loha": LOHA}[kind], path)
    return path


WHY = {
    "checkpoint": "{setting} = {path} is not an adapter file: it holds no LoRA, LoCon, LoHa or "
                  "LoKr weights in kohya naming (its tensors are named like "
                  "'first_stage_model'); a model checkpoint or another kind of file? Set "
                  "{setting} to {what}, or to "
                  '"" to turn it off.',
    "text": "{setting} = {path} is not a safetensors file (it does not start with a "
            'safetensors header); set {setting} to {what}, or to "" to turn it off.',
    "truncated": "{setting} = {path} is truncated: its header lists 260 bytes of tensor data, "
                 "the file holds 253 (an interrupted download or copy?); set {setting} to "
                 '{what}, or to "" to turn it off.',
    "folder": "{setting} = {path} is a folder, not a .safetensors file; set {setting} to {what}, "
              'or to "" to turn it off.',
    "pickle": "{setting} = {path} is a PyTorch pickle/zip file (.ckpt/.pt), not a .safetensors "
              'file; set {setting} to {what}, or to "" to turn it off.',
    "missing": '{setting} = {path} does not exist; set {setting} to {what}, or to "" to turn it '
               "off.",
    "mixed": "{setting} = {path} holds 1 modules that are not LoRA, LoCon, LoHa or LoKr weights "
             "in kohya naming (e.g. 'model'), which our loader cannot apply; set {setting} to "
             '{what}, or to "" to turn it off.',
}
WHAT = {"network.resume_from": "an adapter .safetensors file saved by this trainer or by kohya",
        "sample.lcm_lora": "an LCM-LoRA .safetensors file such as latent-consistency's "
                           "lcm-lora-sdv1-5"}


@pytest.mark.parametrize("setting", WHAT)
@pytest.mark.parametrize("kind", WHY)
def test_a_wrong_adapter_file_is_refused_naming_setting_file_and_source(tmp_path, kind, setting):
    path = write_kind(tmp_path / "file.safetensors", kind)
    config = load_config(None, ["model.path=demo", "dataset.path=demo", f"{setting}={path}"])
    with pytest.raises(UserError) as raised:
        require_paths(config)
    why = WHY[kind].format(setting=setting, path=path, what=WHAT[setting])
    assert str(raised.value) == f"--set {setting}={path}: {why}"


@pytest.mark.parametrize("kind", ["lora", "loha"])
def test_adapter_files_pass(tmp_path, kind):
    lora = write_kind(tmp_path / "a.safetensors", kind)
    require_paths(load_config(None, ["model.path=demo", "dataset.path=demo",
                                     f"network.resume_from={lora}", f"sample.lcm_lora={lora}"]))


def test_the_file_is_named_when_the_value_came_from_it(tmp_path):
    write_kind(tmp_path / "lcm.safetensors", "text")
    toml = tmp_path / "run.toml"
    toml.write_text('[model]\npath = "demo"\n[dataset]\npath = "demo"\n'
                    '[sample]\nlcm_lora = "lcm.safetensors"\n')
    with pytest.raises(UserError, match=rf"^{toml}: sample\.lcm_lora = {tmp_path}/lcm\."
                                        "safetensors is not a safetensors file"):
        require_paths(load_config(toml))


def test_preview_decoder_weights_are_read_too(tmp_path):
    taesd = tmp_path / "taesd"
    taesd.mkdir()
    (taesd / "config.json").write_text(json.dumps({"_class_name": "AutoencoderTiny"}))
    (taesd / "diffusion_pytorch_model.safetensors").write_bytes(save(ADAPTER)[:100])
    config = load_config(None, ["model.path=demo", "dataset.path=demo",
                                f"sample.preview_decoder={taesd}"])
    with pytest.raises(UserError) as raised:
        require_paths(config)
    assert str(raised.value) == (
        f"--set sample.preview_decoder={taesd}: sample.preview_decoder = {taesd}: "
        "diffusion_pytorch_model.safetensors is truncated or not a safetensors file: its header "
        "should be 328 bytes, the file holds 100; expected a diffusers AutoencoderTiny folder "
        "for SD 1.x, such as madebyollin/taesd (config.json and "
        "diffusion_pytorch_model.safetensors).")


def test_the_check_stays_torch_free(tmp_path):
    # The GUI calls require_paths in its own process, which must never import torch.
    lora = write_kind(tmp_path / "a.safetensors", "lora")
    code = ("import sys; from trainer.config import load_config, require_paths; "
            f"require_paths(load_config(None, ['model.path=demo', 'dataset.path=demo', "
            f"'sample.lcm_lora={lora}'])); print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=True)
    assert done.stdout == "False\n"


class ModelLoaded(Exception):
    pass


def test_training_with_a_bad_lcm_lora_stops_before_the_model_loads(tmp_path, monkeypatch,
                                                                   capsys):
    def load_model(config, device):  # noqa: ARG001
        raise ModelLoaded

    monkeypatch.setattr(train_setup, "load_model", load_model)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    argv = ["train", str(REPO / "presets" / "cpu-demo.toml"), "--set", f"output.dir={out}",
            "--set", "train.steps=2"]
    bad = write_kind(tmp_path / "lcm.safetensors", "truncated")
    assert cli.main([*argv, "--set", f"sample.lcm_lora={bad}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --set sample.lcm_lora={bad}: sample.lcm_lora = {bad} is "
                          "truncated: ")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()  # no metrics.jsonl, no state, no half-made run folder

    # A readable adapter gets past the check and on to loading the model.
    good = write_kind(tmp_path / "good.safetensors", "lora")
    with pytest.raises(ModelLoaded):
        cli.main([*argv, "--set", f"sample.lcm_lora={good}"])
    assert not (out / "metrics.jsonl").exists() and not (out / "state").exists()
