"""The demo model: SD1.5's module names and kinds, deterministic, and its CLI.

Also checks the shipped SD1.5 configs against SD1.5's known sizes.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.sd15_config import build_sd15_from_config

REPO = Path(__file__).resolve().parent.parent
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@pytest.fixture(scope="module")
def demo(demo_model_dir):
    from trainer.model_loading import load_sd_model

    return load_sd_model(demo_model_dir / "diffusers")


@pytest.fixture(scope="module")
def sd15_meta():
    """SD1.5-size models without weights (structure only, instant)."""
    return build_sd15_from_config(with_vae=True, device="meta")


def _layout(model):
    """(name, class, kernel size) of every module: what LoRA targeting sees."""
    return [
        (n, type(m).__name__, getattr(m, "kernel_size", None)) for n, m in model.named_modules()
    ]


def _lora_targets(unet, text_encoder):
    """docs/FORMATS.md "Targeted modules": Linear and 1x1 Conv2d inside
    Transformer2DModel; six TE kinds."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    unet_names = set()
    for block_name, block in unet.named_modules():
        if isinstance(block, Transformer2DModel):
            for name, module in block.named_modules():
                if isinstance(module, torch.nn.Linear) or (
                    isinstance(module, torch.nn.Conv2d) and module.kernel_size == (1, 1)
                ):
                    unet_names.add(f"{block_name}.{name}")
    text_names = {
        n for n, _ in text_encoder.named_modules() if n.rsplit(".", 1)[-1] in TEXT_TARGETS
    }
    return unet_names, text_names


def test_demo_has_sd15_module_names_and_kinds(demo, sd15_meta):
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    unet = demo.unet
    blocks = [m for m in unet.modules() if isinstance(m, Transformer2DModel)]
    assert len(blocks) == 16
    for block in blocks:
        assert isinstance(block.proj_in, torch.nn.Conv2d) and block.proj_in.kernel_size == (1, 1)
        assert isinstance(block.proj_out, torch.nn.Conv2d) and block.proj_out.kernel_size == (1, 1)
    assert [type(b).__name__ for b in unet.down_blocks] == ["CrossAttnDownBlock2D"] * 3 + [
        "DownBlock2D"
    ]
    assert type(unet.mid_block).__name__ == "UNetMidBlock2DCrossAttn"
    assert [type(b).__name__ for b in unet.up_blocks] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert len(demo.text_encoder.encoder.layers) == 12
    assert demo.text_encoder.config.vocab_size == 49408
    assert demo.text_encoder.config.max_position_embeddings == 77
    assert demo.vae.config.latent_channels == 4 and len(demo.vae.config.block_out_channels) == 4

    # Identical module trees (names, kinds, kernel sizes, conv_shortcut placement).
    assert _layout(unet) == _layout(sd15_meta.unet)
    assert _layout(demo.text_encoder) == _layout(sd15_meta.text_encoder)
    unet_targets, text_targets = _lora_targets(unet, demo.text_encoder)
    assert (len(unet_targets), len(text_targets)) == (192, 72)
    assert (unet_targets, text_targets) == _lora_targets(sd15_meta.unet, sd15_meta.text_encoder)


def test_demo_diffusers_folder_is_a_pipeline(demo_model_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        demo_model_dir / "diffusers", local_files_only=True
    )
    assert pipe.safety_checker is None
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert pipe.vae_scale_factor == 8
    assert pipe.scheduler.config.beta_start == 0.00085 and pipe.scheduler.config.steps_offset == 1
    assert (demo_model_dir / "diffusers" / "tokenizer" / "merges.txt").is_file()


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_cli_is_deterministic_across_processes(demo_model_dir, tmp_path):
    out = tmp_path / "again"
    result = subprocess.run(
        [sys.executable, "-m", "trainer", "make-demo-model", str(out), "--seed", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert str(out / "diffusers") in result.stdout
    assert str(out / "demo-sd15.safetensors") in result.stdout
    first, second = _files(demo_model_dir), _files(out)
    assert (
        "demo-sd15.safetensors" in first
        and "diffusers/unet/diffusion_pytorch_model.safetensors" in first
    )
    assert first.keys() == second.keys()
    assert [name for name in first if first[name] != second[name]] == []


def test_another_seed_gives_other_weights(demo_model_dir, tmp_path):
    from trainer.demo_model import make_demo_model

    paths = make_demo_model(tmp_path, seed=1)
    assert (
        paths["single_file"].read_bytes() != (demo_model_dir / "demo-sd15.safetensors").read_bytes()
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["make-demo-model", "DIR", "--seed", "abc"], "invalid int value: 'abc'"),
        (["make-demo-model"], "the following arguments are required: DIR"),
        (["no-such-command"], "invalid choice: 'no-such-command'"),
        (["make-demo-model", "AFILE"], "is a file; make-demo-model expects a folder"),
    ],
)
def test_cli_bad_arguments_give_one_clean_message(tmp_path, args, expected):
    (tmp_path / "afile").write_text("x")
    args = [
        a.replace("AFILE", str(tmp_path / "afile")).replace("DIR", str(tmp_path / "d"))
        for a in args
    ]
    result = subprocess.run(
        [sys.executable, "-m", "trainer", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_shipped_configs_are_sd15(sd15_meta):
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    unet, text_encoder, vae = sd15_meta
    assert sum(isinstance(m, Transformer2DModel) for m in unet.modules()) == 16
    assert unet.config.cross_attention_dim == 768
    assert list(unet.config.block_out_channels) == [320, 640, 1280, 1280]
    assert unet.config.attention_head_dim == 8 and unet.config.use_linear_projection is False
    # Published parameter counts of SD1.5: U-Net 859.52M, CLIP ViT-L/14 text 123.06M, VAE 83.65M.
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert sum(p.numel() for p in text_encoder.parameters()) == 123_060_480
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    config = text_encoder.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (
        768,
        12,
        12,
    )
    assert (config.intermediate_size, config.hidden_act) == (3072, "quick_gelu")
    assert vae.config.scaling_factor == 0.18215 and vae.config.latent_channels == 4
