"""`python -m trainer import-kohya` beyond the three configs: dataset-config folders,
sd-scripts defaults, other kohya file kinds, what is refused, and a training run."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import pytest

from datasets_tools.scan import scan_dataset
from tests.kohya_import_helpers import (
    gui_character,
    locon_files,
    one_item,
    run_import,
    unmapped,
    write_image,
)
from trainer.config import load_config
from trainer.config_schema import SECTIONS
from trainer.kohya_import import _target
from trainer.kohya_import_tables import SAME_NAMES
from trainer.kohya_names import KOHYA_ALIASES

REPO = Path(__file__).resolve().parents[1]


def test_dataset_config_folders_map_to_our_repeat_folders(tmp_path, capsys):
    """One subset outside an N_name folder: dataset.repeats. A subset whose
    N_name disagrees with num_repeats and a reg subset with repeats: the
    listed command renames it, after which the scan counts kohya's repeats."""
    write_image(tmp_path / "plain" / "a.png")
    write_image(tmp_path / "reg" / "b.png", caption=None)
    dataset = tmp_path / "dataset.toml"
    dataset.write_text(f"""
[[datasets]]
  [[datasets.subsets]]
  image_dir = "{tmp_path / 'plain'}"
  num_repeats = 5
  [[datasets.subsets]]
  image_dir = "{tmp_path / 'reg'}"
  num_repeats = 3
  is_reg = true
  class_tokens = "dog"
""", encoding="utf-8")
    out = tmp_path / "p.toml"
    assert run_import(capsys, dataset, "--out", out)[0] == 0
    config = load_config(out)
    assert (config.dataset.path, config.dataset.repeats) == (str(tmp_path / "plain"), 5)
    assert [i.repeats for i in scan_dataset(config.dataset.path, repeats=5).items] == [5]
    assert config.dataset.reg_path == str(tmp_path / "reg")
    item = one_item(unmapped(out.read_text()), f"dataset config subset {tmp_path / 'reg'} num_")
    command = item.split("run ")[1].split(" and set")[0]
    assert shlex.split(command)[0] == "mv"
    subprocess.run(shlex.split(command), check=True)
    renamed = scan_dataset(tmp_path / "3_dog")
    assert [(i.repeats, i.caption) for i in renamed.items] == [(3, "dog")]


def test_several_subsets_share_their_parent_as_dataset_path(tmp_path, capsys):
    for name in ("4_cat", "2_dog"):
        write_image(tmp_path / "pets" / name / "a.png")
    write_image(tmp_path / "elsewhere" / "bird" / "a.png")
    subsets = [("pets/4_cat", 4), ("pets/2_dog", 2), ("elsewhere/bird", 6)]
    dataset = tmp_path / "dataset.toml"
    dataset.write_text("[[datasets]]\n" + "".join(
        f'[[datasets.subsets]]\nimage_dir = "{tmp_path / d}"\nnum_repeats = {n}\n'
        for d, n in subsets), encoding="utf-8")
    out = tmp_path / "p.toml"
    assert run_import(capsys, dataset, "--out", out)[0] == 0
    config = load_config(out)
    assert config.dataset.path == str(tmp_path / "pets")
    repeats = {i.rel_path.split("/")[0]: i.repeats for i in scan_dataset(config.dataset.path).items}
    assert repeats == {"4_cat": 4, "2_dog": 2}
    item = one_item(unmapped(out.read_text()), f"dataset config subset {tmp_path / 'elsewhere'}")
    assert f"mv {tmp_path / 'elsewhere' / 'bird'} {tmp_path / 'elsewhere' / '6_bird'}" in item


def test_sd_scripts_defaults_fill_what_its_toml_leaves_out(tmp_path, capsys):
    """sd-scripts' own defaults differ from ours for these: the preset writes kohya's."""
    source = tmp_path / "minimal.toml"
    source.write_text('network_module = "networks.lora"\ntrain_data_dir = "/data/x"\n',
                      encoding="utf-8")
    out = tmp_path / "p.toml"
    assert run_import(capsys, source, "--out", out)[0] == 0
    config = load_config(out)
    assert (config.network.rank, config.network.alpha) == (4, 1.0)
    assert (config.train.unet_lr, config.train.text_encoder_lr) == (2e-6, 2e-6)
    assert (config.train.scheduler, config.train.optimizer, config.train.steps) == (
        "constant", "adamw", 1600)
    assert (config.dataset.caption_extension, config.dataset.cache_latents) == (".caption", "off")
    assert config.output.save_precision == "fp32"
    assert "rank = 4  # kohya's default network_dim = 4" in out.read_text()


def test_a_kohya_ss_gui_toml_reads_as_the_gui_config(tmp_path, capsys):
    source = tmp_path / "gui.toml"
    source.write_text('LoRA_type = "LyCORIS/LoHa"\nnetwork_dim = 8\nnetwork_alpha = 4\n'
                      'conv_dim = 4\nconv_alpha = 2\nepoch = 3\nmax_train_steps = 0\n'
                      'train_data_dir = "/data/x"\n', encoding="utf-8")
    out = tmp_path / "p.toml"
    code, printed, _ = run_import(capsys, source, "--out", out)
    assert code == 0 and f"read: kohya_ss GUI config {source}" in printed
    config = load_config(out)
    n = config.network
    assert (n.type, n.rank, n.alpha, n.conv_rank, n.conv_alpha) == ("loha", 8, 4.0, 4, 2.0)
    assert (config.train.epochs, config.train.steps) == (3, 0)
    # No sd-scripts argparse defaults for a GUI config, which gives every field itself.
    assert config.dataset.caption_extension == ".txt" and config.train.scheduler == \
        "constant_with_warmup"


def test_a_gui_lokr_preset_with_quoted_arguments(tmp_path, capsys):
    """Fields as kohya_ss's own LoKr presets have them: a huge dim for full
    factors, quoted optimizer arguments, extra command-line parameters."""
    source = gui_character(tmp_path, **{
        "LoRA_type": "LyCORIS/LoKr", "network_dim": 100000, "network_alpha": 1,
        "conv_dim": 100000, "conv_alpha": 1, "factor": 6, "optimizer": "Prodigy",
        "optimizer_args": '"d0=1e-5" "weight_decay=0.4" "decouple=True"',
        "additional_parameters": '--lr_scheduler_type "CosineAnnealingLR" --lr_scheduler_args '
                                 '"T_max=1000" "eta_min=0e-0"',
        "resolution": "", "max_resolution": "512,512", "noise_offset_type": "Multires",
        "multires_noise_iterations": 6, "sdxl": False, "sdxl_no_half_vae": True,
        "bucket_reso_steps": 1, "lora_network_weights": ""})
    out = tmp_path / "lokr.toml"
    assert run_import(capsys, source, "--out", out)[0] == 0
    config = load_config(out)
    n = config.network
    assert (n.type, n.full_matrix, n.factor, n.conv_rank) == ("lokr", True, 6, 8)
    assert (config.train.optimizer, config.train.weight_decay) == ("prodigy", 0.4)
    assert (config.dataset.resolution, config.dataset.bucket_step) == (512, 64)
    text = out.read_text()
    items = unmapped(text)
    assert one_item(items, 'optimizer_args d0 = "1e-5"')
    assert one_item(items, 'optimizer_args decouple = "True"')
    assert one_item(items, 'lr_scheduler_type = "CosineAnnealingLR"')
    assert one_item(items, 'lr_scheduler_args = ["T_max=1000", "eta_min=0e-0"]')
    assert "only kohya's Original" in one_item(items, 'noise_offset_type = "Multires"')
    assert one_item(items, "multires_noise_iterations = 6")
    assert "multiple of 8" in one_item(items, "bucket_reso_steps = 1")
    assert "sdxl_no_half_vae = true (only with sdxl = true)" in text


def test_unsupported_algorithms_and_options_are_listed(tmp_path, capsys):
    source = gui_character(tmp_path, LoRA_type="LyCORIS/iA3", use_tucker=True,
                            lr_scheduler="adafactor", optimizer="DAdaptAdam",
                            sample_sampler="dpmsolver++", sdxl=True)
    out = tmp_path / "p.toml"
    assert run_import(capsys, source, "--out", out)[0] == 0
    config = load_config(out)
    assert (config.network.type, config.train.optimizer) == ("lora", "adamw")
    items = unmapped(out.read_text())
    assert "plain LoRA instead" in one_item(items, 'LoRA_type = "LyCORIS/iA3"')
    assert "applies to locon, loha, lokr" in one_item(items, "use_tucker = true")
    assert "the preset keeps its default" in one_item(items, 'lr_scheduler = "adafactor"')
    assert "the preset keeps adamw" in one_item(items, 'optimizer = "DAdaptAdam"')
    assert "euler_a and ddim" in one_item(items, 'sample_sampler = "dpmsolver++"')
    assert "SD1.5-family" in one_item(items, "sdxl = true")


@pytest.mark.parametrize("suffix,content", [
    (".json", json.dumps([{"prompt": "a cat", "width": 512, "seed": 3, "sample_sampler": "k"}])),
    (".toml", '[prompt]\nwidth = 512\nseed = 3\n[[prompt.subset]]\nprompt = "a cat"\n'
              'sample_sampler = "k"\n'),
])
def test_json_and_toml_prompt_files(tmp_path, capsys, suffix, content):
    (tmp_path / f"p{suffix}").write_text(content, encoding="utf-8")
    source = gui_character(tmp_path, sample_prompts=str(tmp_path / f"p{suffix}"))
    out = tmp_path / "preset.toml"
    assert run_import(capsys, source, "--out", out)[0] == 0
    assert sorted(load_config(out).sample.prompts[0].split(" --")) == ["a cat", "d 3", "w 512"]
    assert one_item(unmapped(out.read_text()), 'sample prompt 1 option = "--sample_sampler k"')


def test_every_kohya_name_the_importer_maps_is_a_key_of_ours():
    for name in [*KOHYA_ALIASES, *SAME_NAMES]:
        target = _target(name)
        if target is not None:
            section, field = target[0].split(".")
            assert field in SECTIONS[section].model_fields, name


@pytest.mark.parametrize("name,content,message", [
    ("bad.json", '{\n  "network_dim": 32,\n  "x": \n}', "not valid JSON: Expecting value at "
                                                         "line 4, column 1"),
    ("bad.toml", "[training_arguments]\nmax_train_steps = = 3\n", "TOML syntax error: "
                                                                   "Invalid value (at line 2"),
    ("other.json", '{"hello": 1}', "is not a kohya config"),
    ("list.json", "[1, 2]", "is not a kohya config"),
    ("ours.toml", '[model]\npath = ""\n[train]\nsteps = 10\n', "is already a preset of this "
                                                              "trainer"),
])
def test_files_that_are_not_kohya_configs(tmp_path, capsys, name, content, message):
    (tmp_path / name).write_text(content, encoding="utf-8")
    code, printed, err = run_import(capsys, tmp_path / name, "--out", tmp_path / "p.toml")
    assert code == 2 and message in err and str(tmp_path / name) in err
    assert not (tmp_path / "p.toml").exists() and printed == ""


def test_out_is_checked_before_anything_is_written(tmp_path, capsys):
    source = gui_character(tmp_path)
    code, _, err = run_import(capsys, source, "--out", tmp_path / "p.json")
    assert code == 2 and "ending in .toml" in err
    existing = tmp_path / "exists.toml"
    existing.write_text("keep me\n")
    code, _, err = run_import(capsys, source, "--out", existing)
    assert code == 2 and "--force" in err and existing.read_text() == "keep me\n"
    training, dataset = locon_files(tmp_path)
    code, _, err = run_import(capsys, training, "--dataset-config", dataset, "--out", dataset,
                           "--force")
    assert code == 2 and "is the input" in err
    code, _, err = run_import(capsys, source, "--dataset-config", training, "--out",
                           tmp_path / "x.toml")
    assert code == 2 and "is not an sd-scripts dataset config" in err
    code, _, err = run_import(capsys, tmp_path / "missing.json", "--out", tmp_path / "x.toml")
    assert code == 2 and "not found" in err
    assert not (tmp_path / "x.toml").exists()


def test_an_imported_gui_locon_trains_with_its_kohya_settings(demo_model_dir, tmp_path, capsys):
    """The preset trains as it is, and the adapter file says what kohya asked for."""
    from networks.file_header import read_header
    from trainer.demo_assets import write_demo_dataset
    from trainer.train import run

    write_demo_dataset(tmp_path / "img", size=64)
    source = tmp_path / "locon.json"
    source.write_text(json.dumps({
        "LoRA_type": "LyCORIS/LoCon", "pretrained_model_name_or_path":
        str(demo_model_dir / "diffusers"), "train_data_dir": str(tmp_path / "img"),
        "output_dir": str(tmp_path / "out"), "output_name": "e2e", "resolution": "64,64",
        "enable_bucket": False, "network_dim": 4, "network_alpha": 2, "conv_dim": 2,
        "conv_alpha": 1, "learning_rate": 1e-3, "unet_lr": 0, "text_encoder_lr": 0,
        "lr_scheduler": "constant", "max_train_steps": 2, "epoch": 1, "train_batch_size": 1,
        "optimizer": "AdamW", "mixed_precision": "no", "save_precision": "float",
        "cache_latents": True, "network_train_unet_only": True, "seed": 3,
        "additional_parameters": "--max_grad_norm 0.5 --min_snr_gamma=5",
    }), encoding="utf-8")
    out = tmp_path / "e2e.toml"
    assert run_import(capsys, source, "--out", out)[0] == 0
    config = load_config(out)
    assert (config.train.max_grad_norm, config.train.min_snr_gamma) == (0.5, 5.0)
    assert (config.train.unet_lr, config.network.train_text_encoder) == (1e-3, False)
    result = run(config)
    assert result.steps_done == 2
    header = read_header(result.final_file)
    meta = header.metadata
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "2")
    assert json.loads(meta["ss_network_args"])["conv_dim"] == "2"
    conv_downs = [info.shape for name, info in header.tensors.items()
                  if name.endswith("lora_down.weight") and len(info.shape) == 4
                  and info.shape[2] == 3]
    assert conv_downs and {shape[0] for shape in conv_downs} == {2}
