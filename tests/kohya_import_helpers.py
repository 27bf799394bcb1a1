"""What the import-kohya tests share: running the verb, writing images, reading
the preset's "Not mapped" list."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from trainer.cli import main

REPO = Path(__file__).resolve().parents[1]


def run_import(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["import-kohya", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def write_image(path: Path, caption: str | None = "a photo") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), (120, 30, 200)).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")


def unmapped(text: str) -> list[str]:
    """The preset's "Not mapped" comment lines, continuation lines joined."""
    block = text.split("# Not mapped")[1].split("\n#\n")[0]
    items = []
    for line in block.splitlines()[1:]:
        if line.startswith("#   - "):
            items.append(line[6:])
        elif line.startswith("#     ") and items:
            items[-1] += " " + line[6:]
    return items


def one_item(items: list[str], start: str) -> str:
    found = [item for item in items if item.startswith(start)]
    assert len(found) == 1, (start, items)
    return found[0]


def gui_character(tmp_path: Path, **changes) -> Path:
    (tmp_path / "prompts.txt").write_text(
        "# kohya prompt file\n"
        "sks girl, smiling --n lowres, blurry --w 512 --h 768 --d 42 --s 28 --l 7.5\n"
        "\n"
        "sks girl, in a park --ss euler --d 7\n"
        "sks girl, sitting --w 500 --d 1\n", encoding="utf-8")
    data = {
        "LoRA_type": "Standard", "pretrained_model_name_or_path": str(tmp_path / "sd15.ckpt"),
        "train_data_dir": str(tmp_path / "img"), "reg_data_dir": "",
        "output_dir": str(tmp_path / "model"), "output_name": "sks girl v1",
        "resolution": "512,512", "enable_bucket": True, "min_bucket_reso": 256,
        "max_bucket_reso": 1024, "network_dim": 32, "network_alpha": 16, "conv_dim": 1,
        "conv_alpha": 1, "learning_rate": 0.0001, "unet_lr": 0.0001, "text_encoder_lr": 5e-05,
        "lr_scheduler": "cosine", "lr_warmup": 10, "train_batch_size": 2, "epoch": 10,
        "max_train_steps": "", "max_train_epochs": "", "mixed_precision": "fp16",
        "save_precision": "fp16", "save_every_n_epochs": 2, "seed": 1234, "clip_skip": 2,
        "caption_extension": ".txt", "shuffle_caption": True, "keep_tokens": 1,
        "noise_offset": 0, "min_snr_gamma": 5, "optimizer": "AdamW8bit", "optimizer_args": "",
        "gradient_checkpointing": True, "gradient_accumulation_steps": 1,
        "cache_latents": True, "cache_latents_to_disk": False, "prior_loss_weight": 1.0,
        "sample_prompts": "prompts.txt", "sample_every_n_steps": 100,
        "sample_sampler": "euler_a", "max_token_length": "75", "xformers": "xformers",
        "color_aug": False, "flip_aug": False, "model_list": "custom",
        "save_model_as": "safetensors", "wandb_api_key": "wk-secret-123",
        "persistent_data_loader_workers": True,
    } | changes
    path = tmp_path / "kohya_gui.json"
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    (tmp_path / "img" / "10_sks girl").mkdir(parents=True)
    return path


def locon_files(tmp_path: Path) -> tuple[Path, Path]:
    training = tmp_path / "locon.toml"
    training.write_text("""
[model_arguments]
pretrained_model_name_or_path = "/models/sd15.safetensors"

[additional_network_arguments]
network_module = "lycoris.kohya"
network_dim = 32
network_alpha = 16
network_args = ["algo=locon", "conv_dim=8", "conv_alpha=4", "preset=full", "use_tucker=True"]

[optimizer_arguments]
optimizer_type = "Prodigy"
learning_rate = 1.0
optimizer_args = ["decouple=True", "d_coef=2"]
lr_scheduler = "cosine_with_restarts"
lr_scheduler_num_cycles = 3
lr_warmup_steps = 0.05

[training_arguments]
max_train_steps = 2000
mixed_precision = "bf16"
save_every_n_steps = 500
color_aug = true
cache_latents = true
cache_latents_to_disk = true
""", encoding="utf-8")
    image_dir = tmp_path / "data" / "10_sks dog"
    write_image(image_dir / "a.png")
    dataset = tmp_path / "dataset.toml"
    dataset.write_text(f"""
[general]
enable_bucket = true
shuffle_caption = true
caption_extension = ".txt"
keep_tokens = 1

[[datasets]]
resolution = [768, 512]
batch_size = 4

  [[datasets.subsets]]
  image_dir = "{image_dir}"
  num_repeats = 10
""", encoding="utf-8")
    return training, dataset
