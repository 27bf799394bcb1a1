"""load_sd_model: diffusers folders, single files, and the errors users see."""

import os
import shutil
import socket

import pytest
import torch
from safetensors.torch import load_file, save_file

from core.errors import UserError
from trainer.model_loading import build_pipeline, load_sd_model

CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]
ONE = torch.ones(1)


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test instead of reaching a hub."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def folder_model(demo_model_dir):
    return load_sd_model(demo_model_dir / "diffusers")


@pytest.fixture(scope="module")
def single_state(demo_model_dir):
    return load_file(str(demo_model_dir / "demo-sd15.safetensors"))


def _assert_same_weights(a, b):
    for part in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert sa.keys() == sb.keys(), part
        for key in sa:
            assert sa[key].dtype == sb[key].dtype, (part, key)
            assert torch.equal(sa[key], sb[key]), (part, key)


def _public(config):
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def _linked_folder(src, dst, skip=(), replace=None):
    """A copy of a diffusers folder whose parts are symlinks (cheap)."""
    dst.mkdir()
    for entry in src.iterdir():
        if entry.name in skip:
            continue
        if entry.name in (replace or {}):
            replace[entry.name](entry, dst / entry.name)
        elif entry.is_dir():
            (dst / entry.name).symlink_to(entry, target_is_directory=True)
        else:
            shutil.copy(entry, dst / entry.name)
    return dst


def test_single_file_loads_same_weights_as_folder(demo_model_dir, folder_model, no_network):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    single = load_sd_model(demo_model_dir / "demo-sd15.safetensors")
    _assert_same_weights(folder_model, single)
    # Same architecture too, so both compute the same thing.
    assert _public(single.unet.config) == _public(folder_model.unet.config)
    assert _public(single.vae.config) == _public(folder_model.vae.config)
    te_a, te_b = single.text_encoder.config.to_dict(), folder_model.text_encoder.config.to_dict()
    assert {k: te_a[k] for k in te_b if k != "_name_or_path"} == {
        k: te_b[k] for k in te_b if k != "_name_or_path"
    }
    assert not any(p.is_meta for p in single.unet.parameters())
    for model in (single, folder_model):
        assert model.tokenizer("a photo of a cat").input_ids == CAT_IDS
        assert model.prediction_type == "epsilon"
        assert model.noise_scheduler.config.prediction_type == "epsilon"
        assert type(model.noise_scheduler).__name__ == "DDPMScheduler"
        assert model.noise_scheduler.config.beta_schedule == "scaled_linear"
        assert model.noise_scheduler.config.num_train_timesteps == 1000
    assert single.source == demo_model_dir / "demo-sd15.safetensors"


def test_single_file_v_parameterization_and_dtype(demo_model_dir):
    model = load_sd_model(
        demo_model_dir / "demo-sd15.safetensors", v_parameterization=True, dtype=torch.bfloat16
    )
    assert model.prediction_type == "v_prediction"
    assert model.noise_scheduler.config.prediction_type == "v_prediction"
    for part in (model.unet, model.vae, model.text_encoder):
        assert {p.dtype for p in part.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("layout", ["text_model", "flat"])
def test_both_single_file_text_encoder_layouts(tmp_path, single_state, folder_model, layout):
    prefix = "cond_stage_model.transformer.text_model."
    state = dict(single_state)
    if layout == "flat":  # early SD checkpoints: no `text_model.` level
        state = {
            k.replace(prefix, "cond_stage_model.transformer.") if k.startswith(prefix) else k: v
            for k, v in state.items()
        }
    save_file(state, str(tmp_path / "m.safetensors"))
    _assert_same_weights(folder_model, load_sd_model(tmp_path / "m.safetensors"))


def test_folder_with_text_model_prefixed_weights(tmp_path, demo_model_dir, folder_model):
    """Folders written by transformers < 5.6 keep `text_model.` in the keys."""

    def prefixed(src, dst):
        dst.mkdir()
        shutil.copy(src / "config.json", dst / "config.json")
        state = load_file(str(src / "model.safetensors"))
        save_file({f"text_model.{k}": v for k, v in state.items()}, str(dst / "model.safetensors"))

    folder = _linked_folder(
        demo_model_dir / "diffusers", tmp_path / "m", replace={"text_encoder": prefixed}
    )
    _assert_same_weights(folder_model, load_sd_model(folder))


def test_folder_v_prediction_from_scheduler_config(tmp_path, demo_model_dir):
    def v_scheduler(src, dst):
        dst.mkdir()
        text = (src / "scheduler_config.json").read_text()
        text = text.replace('"prediction_type": "epsilon"', '"prediction_type": "v_prediction"')
        (dst / "scheduler_config.json").write_text(text)

    folder = _linked_folder(
        demo_model_dir / "diffusers", tmp_path / "m", replace={"scheduler": v_scheduler}
    )
    model = load_sd_model(folder, v_parameterization=False)
    assert model.prediction_type == "v_prediction"
    assert model.noise_scheduler.config.prediction_type == "v_prediction"


def test_folder_without_tokenizer_uses_offline_one(tmp_path, demo_model_dir):
    folder = _linked_folder(demo_model_dir / "diffusers", tmp_path / "m", skip={"tokenizer"})
    assert load_sd_model(folder).tokenizer("a photo of a cat").input_ids == CAT_IDS


def test_folder_missing_component(tmp_path, demo_model_dir):
    folder = _linked_folder(demo_model_dir / "diffusers", tmp_path / "m", skip={"vae"})
    with pytest.raises(UserError) as info:
        load_sd_model(folder)
    message = str(info.value)
    assert (
        str(folder) in message and "vae" in message and "expected a complete diffusers" in message
    )


def test_folder_with_truncated_weights(tmp_path, demo_model_dir):
    def truncated(src, dst):
        dst.mkdir()
        shutil.copy(src / "config.json", dst / "config.json")
        data = (src / "diffusion_pytorch_model.safetensors").read_bytes()
        (dst / "diffusion_pytorch_model.safetensors").write_bytes(data[: len(data) // 2])

    folder = _linked_folder(
        demo_model_dir / "diffusers", tmp_path / "m", replace={"unet": truncated}
    )
    with pytest.raises(UserError, match="could not be loaded as a diffusers folder") as info:
        load_sd_model(folder)
    assert str(folder) in str(info.value)


def test_missing_path(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(UserError) as info:
        load_sd_model(missing)
    message = str(info.value)
    assert str(missing) in message and "does not exist" in message
    assert "expected a Stable Diffusion 1.x .safetensors file" in message


def test_truncated_safetensors(tmp_path, demo_model_dir):
    data = (demo_model_dir / "demo-sd15.safetensors").read_bytes()
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(data[: len(data) // 3])
    with pytest.raises(UserError) as info:
        load_sd_model(broken)
    message = str(info.value)
    assert str(broken) in message and "truncated or corrupt" in message
    assert "Stable Diffusion 1.x checkpoint" in message


@pytest.mark.parametrize(
    ("tensors", "looks_like"),
    [
        ({"weight": torch.randn(3, 3)}, "holds 1 tensor(s) named like 'weight'"),
        (
            {
                "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
                "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4),
            },
            "LoRA/LyCORIS adapter",
        ),
        (
            {
                "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": ONE,
                "model.diffusion_model.label_emb.0.0.weight": torch.ones(4, 4),
            },
            "SDXL checkpoint",
        ),
        (
            {"model.diffusion_model.out.2.weight": torch.ones(4, 4, 3, 3)},
            "no VAE and no text encoder",
        ),
    ],
)
def test_safetensors_that_is_not_sd1(tmp_path, tensors, looks_like):
    path = tmp_path / "other.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(UserError) as info:
        load_sd_model(path)
    message = str(info.value)
    assert str(path) in message and "is not a Stable Diffusion 1.x checkpoint" in message
    assert "expected U-Net weights named model.diffusion_model.*" in message
    assert looks_like in message


def test_pickle_checkpoint_needs_opt_in(tmp_path, single_state, folder_model):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": single_state, "global_step": 1}, str(ckpt))
    with pytest.raises(UserError) as info:
        load_sd_model(ckpt)
    message = str(info.value)
    assert (
        str(ckpt) in message and "pickle" in message and "expected a .safetensors file" in message
    )
    _assert_same_weights(folder_model, load_sd_model(ckpt, allow_pickle=True))


class _NotATensor:
    pass


def test_pickle_with_code_is_refused_even_with_opt_in(tmp_path):
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.ones(1)}, "obj": _NotATensor()}, str(ckpt))
    with pytest.raises(UserError, match="weights_only=True") as info:
        load_sd_model(ckpt, allow_pickle=True)
    assert str(ckpt) in str(info.value)


def test_folder_with_only_pickle_weights_needs_opt_in(tmp_path, demo_model_dir):
    def as_bin(src, dst):
        dst.mkdir()
        shutil.copy(src / "config.json", dst / "config.json")
        state = load_file(str(src / "diffusion_pytorch_model.safetensors"))
        torch.save(state, str(dst / "diffusion_pytorch_model.bin"))

    folder = _linked_folder(demo_model_dir / "diffusers", tmp_path / "m", replace={"vae": as_bin})
    with pytest.raises(UserError, match="pickle"):
        load_sd_model(folder)
    assert load_sd_model(folder, allow_pickle=True).vae is not None


def test_build_pipeline_runs_and_takes_kohya_lora(tmp_path, demo_model_dir):
    model = load_sd_model(demo_model_dir / "demo-sd15.safetensors")
    pipe = build_pipeline(model)
    assert pipe.unet is model.unet and pipe.text_encoder is model.text_encoder
    assert pipe.safety_checker is None
    image = pipe(
        "a photo of a cat",
        height=64,
        width=64,
        num_inference_steps=1,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert image.shape == (1, 64, 64, 3)

    lora = {}
    names = [
        f"lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_{s}"
        for s in ("q", "k", "v", "out_0")
    ]
    names += [
        f"lora_te_text_model_encoder_layers_0_self_attn_{s}_proj" for s in ("q", "k", "v", "out")
    ]
    width = {"mid": 128, "lora_te": 32}
    for name in names:
        dim = width["mid"] if "mid_block" in name else width["lora_te"]
        lora[f"{name}.lora_down.weight"] = torch.randn(4, dim)
        lora[f"{name}.lora_up.weight"] = torch.randn(dim, 4)
        lora[f"{name}.alpha"] = torch.tensor(4.0)
    save_file(lora, str(tmp_path / "lora.safetensors"))
    pipe.load_lora_weights(str(tmp_path / "lora.safetensors"))
    assert pipe.get_active_adapters()
