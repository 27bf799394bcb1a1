"""`python -m trainer import-kohya`: kohya configs (written here) become presets
that load, with every option either mapped or listed with its reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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

REPO = Path(__file__).resolve().parents[1]


def test_a_gui_character_lora_becomes_a_preset_that_loads(tmp_path, capsys):
    source, out = gui_character(tmp_path), tmp_path / "character.toml"
    code, printed, err = run_import(capsys, source, "--out", out)
    assert code == 0, err
    config = load_config(out)
    assert (config.network.type, config.network.rank, config.network.alpha) == ("lora", 32, 16)
    assert (config.train.unet_lr, config.train.text_encoder_lr) == (1e-4, 5e-5)
    assert (config.train.scheduler, config.train.optimizer) == ("cosine", "adamw8bit")
    assert (config.train.steps, config.train.epochs, config.train.batch_size) == (0, 10, 2)
    assert config.train.mixed_precision == "fp16" and config.output.save_precision == "fp16"
    assert (config.train.seed, config.train.min_snr_gamma) == (1234, 5.0)
    assert config.train.attention == "xformers" and config.train.gradient_checkpointing
    assert config.model.clip_skip == 2 and config.model.path == str(tmp_path / "sd15.ckpt")
    assert config.dataset.path == str(tmp_path / "img")
    assert (config.dataset.resolution, config.dataset.cache_latents) == (512, "memory")
    assert config.dataset.shuffle_captions and config.dataset.keep_tokens == 1
    assert config.output.name == "sks_girl_v1" and config.output.dir == str(tmp_path / "model")
    # The prompt file's options, in our syntax; kohya's --ss has no equivalent.
    assert config.sample.prompts == [
        "sks girl, smiling --n lowres, blurry --w 512 --h 768 --d 42 --s 28 --l 7.5",
        "sks girl, in a park --d 7", "sks girl, sitting --d 1"]
    assert config.sample.every_n_steps == 100

    text = out.read_text(encoding="utf-8")
    items = unmapped(text)
    assert "kohya_ss GUI setting" in one_item(items, 'model_list = "custom"')
    assert "output.save_every_n_steps" in one_item(items, "save_every_n_epochs = 2")
    assert "set train.warmup_steps" in one_item(items, "lr_warmup = 10")
    assert "--ss euler" in one_item(items, "sample prompt 4 option")
    assert "multiple of 8" in one_item(items, 'sample prompt 5 option = "--w 500"')
    assert "output.name = sks_girl_v1" in one_item(items, 'output_name = "sks girl v1"')
    assert one_item(items, "wandb_api_key = (hidden)")
    assert "wk-secret-123" not in text and "wk-secret-123" not in printed
    assert "rank = 32  # network_dim = 32" in text
    # Options kohya gives at our default value are not written, but named.
    assert "#   - prior_loss_weight = 1.0" in text and "prior_loss_weight =" not in \
        text.split("[model]")[1]
    assert 'model.path = "' + str(tmp_path / "sd15.ckpt") + '" does not exist' in printed
    lines = printed.strip().splitlines()
    assert lines[0] == f"read: kohya_ss GUI config {source}"
    assert f"not mapped ({len(items)}):" in lines
    assert lines[-1] == f"wrote: {out}"


def test_the_import_is_deterministic_and_steps_give_the_warmup(tmp_path, capsys):
    source = gui_character(tmp_path, epoch=1, max_train_steps=1500)
    first, second = tmp_path / "a.toml", tmp_path / "b.toml"
    assert run_import(capsys, source, "--out", first)[0] == 0
    assert run_import(capsys, source, "--out", second)[0] == 0
    assert first.read_bytes() == second.read_bytes()
    assert run_import(capsys, source, "--out", first, "--force")[0] == 0
    assert first.read_bytes() == second.read_bytes()
    third = tmp_path / "c.toml"  # another process, another hash seed: the same bytes
    subprocess.run([sys.executable, "-m", "trainer", "import-kohya", str(source), "--out",
                    str(third)], check=True, capture_output=True, cwd=REPO,
                   env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert third.read_bytes() == first.read_bytes()
    config = load_config(first)
    # max_train_steps wins over the GUI's epoch; lr_warmup is 10% of those steps.
    assert (config.train.steps, config.train.epochs, config.train.warmup_steps) == (1500, 0, 150)
    epoch = one_item(unmapped(first.read_text()), "epoch = 1")
    assert "kohya uses max_train_steps instead" in epoch


def test_an_sd_scripts_locon_with_a_dataset_config(tmp_path, capsys):
    training, dataset = locon_files(tmp_path)
    out = tmp_path / "preset.toml"
    code, printed, err = run_import(capsys, training, "--dataset-config", dataset, "--out", out)
    assert code == 0, err
    config = load_config(out)
    n = config.network
    assert (n.type, n.rank, n.alpha, n.conv_rank, n.conv_alpha, n.tucker) == (
        "locon", 32, 16.0, 8, 4.0, True)
    t = config.train
    assert (t.optimizer, t.unet_lr, t.text_encoder_lr, t.scheduler) == (
        "prodigy", 1.0, 1.0, "cosine_with_restarts")
    # Prodigy's own weight decay (0) as kohya runs it; 5% of 2000 warmup steps.
    assert (t.weight_decay, t.warmup_steps, t.steps, t.batch_size) == (0.0, 100, 2000, 4)
    assert t.mixed_precision == "bf16" and config.output.save_every_n_steps == 500
    # sd-scripts saves fp32 when save_precision is not given.
    assert config.output.save_precision == "fp32"
    d = config.dataset
    assert (d.path, d.cache_latents, d.keep_tokens, d.shuffle_captions) == (
        str(tmp_path / "data" / "10_sks dog"), "disk", 1, True)
    assert d.resolution == 640  # 768 x 512 as one square of about the same area
    # The folder named "10_..." repeats 10x here, as num_repeats = 10 says.
    assert [item.repeats for item in scan_dataset(d.path, repeats=d.repeats).items] == [10]
    items = unmapped(out.read_text())
    assert "no colour augmentation" in one_item(items, "color_aug = true")
    assert "restarts once" in one_item(items, "lr_scheduler_num_cycles = 3")
    assert one_item(items, 'optimizer_args d_coef = "2"')
    assert "non-square" in one_item(items, "dataset config resolution = [768, 512]")
    assert "read: sd-scripts dataset config" in printed and printed.endswith(f"wrote: {out}\n")


def test_a_gui_dreambooth_config_with_reg_images(tmp_path, capsys):
    for folder in ("img/20_sks dog", "reg/1_dog"):
        write_image(tmp_path / folder / "a.png")
    source = tmp_path / "dreambooth.json"
    source.write_text(json.dumps({
        "pretrained_model_name_or_path": "runwayml/stable-diffusion-v1-5",
        "train_data_dir": str(tmp_path / "img"), "reg_data_dir": str(tmp_path / "reg"),
        "output_dir": str(tmp_path / "out"), "output_name": "db", "resolution": "512",
        "learning_rate": 1e-6, "lr_scheduler": "constant", "lr_warmup": 10,
        "max_train_steps": 1600, "prior_loss_weight": 1.0, "train_batch_size": 1,
        "full_bf16": True, "max_bucket_reso": 5000, "save_precision": "float",
    }), encoding="utf-8")
    out = tmp_path / "db.toml"
    code, printed, err = run_import(capsys, source, "--out", out)
    assert code == 0, err
    config = load_config(out)
    assert config.dataset.path == str(tmp_path / "img")
    assert config.dataset.reg_path == str(tmp_path / "reg")
    assert config.train.prior_loss_weight == 1.0 and config.train.unet_lr == 1e-6
    assert config.train.scheduler == "constant" and config.output.save_precision == "fp32"
    assert config.dataset.max_bucket == 1024  # 5000 is refused by the schema: left out
    text = out.read_text()
    items = unmapped(text)
    assert "full fine-tune (DreamBooth)" in one_item(items, "no LoRA_type")
    assert "adapter weights always train in fp32" in one_item(items, "full_bf16 = true")
    assert "less than or equal to 4096" in one_item(items, "max_bucket_reso = 5000")
    assert "(the constant schedule has no warmup)" in text
    assert "a Hugging Face model id?" in printed


