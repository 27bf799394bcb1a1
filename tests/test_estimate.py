"""The memory estimate (trainer/estimate.py): its parts against their own
definitions, the meta-device trace against real tensors, three real training
runs' measured peaks, the CLI and the Train tab's view. SD1.5 and the other
measured configs are in bench/memory_estimate.py (BENCHMARKS.md)."""

from __future__ import annotations

import pytest
import torch

from bench.memory_estimate import DEMO_BASE, DEMO_CONFIGS, estimated, measure
from trainer import estimate as est
from trainer.config import load_config
from trainer.demo_model import DEMO_TEXT, DEMO_UNET, DEMO_VAE
from trainer.estimate_activations import (
    LiveBytes,
    StepShape,
    attach_meta_network,
    build_meta_models,
    fused_attention,
    measure_step,
)
from trainer.estimate_models import model_configs, weight_bytes
from trainer.sd15_config import load_sd15_config

DEMO = DEMO_BASE + ["dataset.resolution=64", "train.batch_size=2"]


def demo_configs():
    return ({**load_sd15_config("unet"), **DEMO_UNET},
            {**load_sd15_config("text_encoder"), **DEMO_TEXT},
            {**load_sd15_config("vae"), **DEMO_VAE})


def step_bytes(checkpointing: bool, batch: int = 2, side: int = 128, train_te: bool = False):
    from networks.network import NetworkSpec

    unet, te, vae = build_meta_models(*demo_configs())
    attach_meta_network(NetworkSpec("lora", rank=4, alpha=4, train_text_encoder=train_te),
                        unet, te, torch.float32)
    return measure_step(unet, te, vae, StepShape(batch, side, side, torch.float32,
                                                 checkpointing, train_te), encode_pixels=False)


def test_the_meta_trace_counts_what_real_cpu_tensors_hold(one_torch_thread):
    """The same step traced on meta (fused attention routed by hand) and run
    for real on the CPU under the same counting mode: the same bytes."""
    from diffusers import UNet2DConditionModel

    from networks.network import AdapterNetwork, NetworkSpec

    def peak(device: str) -> int:
        torch.manual_seed(0)
        with torch.device(device):
            unet = UNet2DConditionModel.from_config(demo_configs()[0])
        unet.requires_grad_(False).train()
        spec = NetworkSpec("lora", rank=4, alpha=4, train_text_encoder=False)
        AdapterNetwork.create(spec, unet, None).attach() if device == "cpu" else \
            attach_meta_network(spec, unet, None, torch.float32)
        live = LiveBytes()
        with fused_attention(), live:
            x = torch.zeros(2, 4, 16, 16, device=device)
            out = unet(x, torch.zeros(2, dtype=torch.long, device=device),
                       torch.zeros(2, 77, 32, device=device)).sample
            out.square().mean().backward()
        return live.peak

    real, meta = peak("cpu"), peak("meta")
    assert real > 10 * 2**20
    assert abs(meta - real) / real < 0.02, (meta, real)


def test_checkpointing_batch_and_the_text_encoder_change_the_activations():
    plain, checkpointed = step_bytes(False), step_bytes(True)
    assert checkpointed.step_peak < 0.6 * plain.step_peak
    assert plain.text_encoder == 0
    double_with_te = step_bytes(False, batch=4, train_te=True)
    assert double_with_te.text_encoder > 0
    # twice the activations, plus the fixed adapter gradients and the text encoder's
    assert 1.5 < (double_with_te.step_peak - double_with_te.text_encoder) / plain.step_peak < 2.05


def test_weight_bytes_by_precision():
    unet, _, _ = build_meta_models(*demo_configs())
    fp32 = weight_bytes(unet, "fp32", "fp32")
    assert fp32 == 4 * sum(p.numel() for p in unet.parameters())
    assert weight_bytes(unet, "bf16", "fp32") == fp32 // 2
    assert weight_bytes(unet, "auto", "bf16") == fp32 // 2
    linear_conv = sum(m.weight.numel() for m in unet.modules()
                      if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
    fp8 = weight_bytes(unet, "fp8", "bf16")
    channels = sum(m.weight.shape[0] for m in unet.modules()
                   if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
    assert fp8 == linear_conv + 4 * channels + 2 * (fp32 // 4 - linear_conv)
    assert 0.24 < weight_bytes(unet, "fp8", "fp32") / fp32 < 0.4  # per-channel scales, biases
    # nf4: Linear weights in 4 bits with an 8-bit absmax per 64 (and an fp32 one
    # per 256 blocks), convolutions in fp8 (trainer/base_precision.py)
    linear = [m.weight for m in unet.modules() if type(m) is torch.nn.Linear]
    convs = [m.weight for m in unet.modules() if type(m) is torch.nn.Conv2d]
    nf4 = sum(w.numel() // 2 + w.numel() // 64 + 4 * -(-w.numel() // 64 // 256) for w in linear)
    fp8_convs = sum(w.numel() + 4 * w.shape[0] for w in convs)
    assert weight_bytes(unet, "nf4", "bf16") == nf4 + fp8_convs + 2 * (fp32 // 4 - linear_conv)


def test_optimizer_states():
    sizes = [100, 5000]
    assert est.optimizer_state_bytes("adamw", sizes) == 2 * 4 * 5100  # two fp32 states
    assert est.optimizer_state_bytes("adamw8bit", sizes) == 8 * 100 + 2 * 5000
    assert est.optimizer_state_bytes("sgd", sizes) == 0
    assert est.optimizer_state_bytes("lion", sizes) == 4 * 5100


def test_the_estimate_adds_up_and_follows_the_config():
    result = est.estimate(load_config(None, DEMO), device="cpu", with_advice=False)
    parts = {p.name.split(" (")[0]: p.bytes for p in result.parts}
    adapter = parts["adapter weights"]
    assert parts["adapter gradients"] == adapter
    assert parts["optimizer state"] == 2 * adapter  # AdamW: two fp32 states per weight
    assert result.run_bytes == sum(p.bytes for p in result.parts if p.counted)
    assert "latent cache in memory" in parts and "text embedding cache" in parts
    uncached = est.estimate(load_config(None, DEMO + ["dataset.cache_latents=off",
                                                      "network.train_text_encoder=true"]),
                            device="cpu", with_advice=False)
    names = [p.name for p in uncached.parts]
    assert any("VAE encoding each batch" in n for n in names)
    assert "text encoder activations (trained)" in names
    assert not any("cache" in n for n in names if "VAE" not in n)


def test_a_cuda_estimate_keeps_caches_in_ram_and_counts_an_fp8_base():
    """Written on the CPU for a GPU: no GPU here, so nothing to compare with."""
    config = load_config(None, DEMO + ["train.mixed_precision=bf16", "model.base_precision=fp8"])
    result = est.estimate(config, device="cuda", with_advice=False)
    by_name = {p.name: p for p in result.parts}
    assert result.process_bytes == 0 and (result.fits is None) == (not torch.cuda.is_available())
    assert not by_name["latent cache in memory (9 images)"].counted
    assert by_name["CUDA context and allocator slack"].bytes >= est.CUDA_CONTEXT_BYTES
    unet, _, _ = build_meta_models(*demo_configs())
    assert by_name["U-Net weights (fp8)"].bytes == weight_bytes(unet, "fp8", "bf16")


def test_a_single_file_gives_the_shapes_of_its_folder(demo_model_dir):
    folder = model_configs(load_config(None, [f"model.path={demo_model_dir / 'diffusers'}"]))
    single_file = demo_model_dir / "demo-sd15.safetensors"
    single = model_configs(load_config(None, [f"model.path={single_file}"]))
    for part in ("unet", "vae"):
        for key in ("block_out_channels", "cross_attention_dim", "layers_per_block"):
            assert getattr(single, part).get(key) == getattr(folder, part).get(key)
    assert single.text_encoder["hidden_size"] == folder.text_encoder["hidden_size"]


def test_advice_names_checkpointing_first_and_stops_when_it_fits():
    from trainer.estimate_advice import advice

    config = load_config(None, DEMO_BASE + ["dataset.resolution=256", "train.batch_size=4"])
    result = est.estimate(config, device="cpu", with_advice=False)
    result.available_bytes = result.total_bytes - 1  # any saving makes it fit
    assert result.fits is False

    def total_of(changed):
        run = est.estimate(changed, device="cpu", with_advice=False).run_bytes
        return run + result.process_bytes

    text = advice(config, result, total_of)
    assert "train.gradient_checkpointing" in text
    assert "train.batch_size" not in text  # it fits after the first change
    assert text.endswith("With these changes it fits.")


# Three configs that differ in what dominates: fixed costs, a trained text
# encoder with the VAE in every step, bf16 activations of a large batch.
MEASURED = ("demo 64 px, batch 1", "demo 256 px, batch 2, text encoder trained, latents uncached",
            "demo 192 px, batch 8, bf16")


@pytest.mark.parametrize("name", MEASURED)
def test_the_estimate_is_within_25_percent_of_a_measured_run(tmp_path, name):
    """A real 3-step run in a child: peak RSS above the idle process."""
    overrides = DEMO_BASE + DEMO_CONFIGS[name]
    measured = measure(overrides, tmp_path)["peak_above_idle"]
    assert 0.75 < estimated(overrides) / measured < 1.25, (estimated(overrides), measured)


def test_cli_names_the_parts_and_refuses_a_bad_config_in_one_line(capsys, tmp_path):
    from trainer.cli import main

    assert main(["estimate", "presets/cpu-demo.toml", "--set", "model.path=demo",
                 "--set", "dataset.path=demo", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for words in ("U-Net weights (fp32)", "adapter gradients", "optimizer state (adamw)",
                  "activations", "total", "available:"):
        assert words in out
    assert main(["estimate", "presets/cpu-demo.toml", "--set", "train.batch_size=0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "train.batch_size" in err and err.count("\n") == 1
    assert main(["estimate", "presets/cpu-demo.toml", "--set",
                 f"model.path={tmp_path / 'none.safetensors'}"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_the_train_tab_shows_the_estimate_or_why_not(tmp_path):
    from gui import estimate_view, train_tab
    from gui.datadir import DataDirs
    from gui.form import config_to_values
    from gui.handlers import Context
    from gui.jobs import JobRunner

    dirs = DataDirs(tmp_path / "data").create()
    ctx = Context(dirs, JobRunner(dirs.jobs), {})
    values = config_to_values(load_config(None, DEMO))
    text = train_tab.memory_estimate(ctx, None, values)
    assert text.startswith("**Memory estimate** on ")
    for words in ("U-Net weights", "optimizer state", "**total**"):
        assert words in text
    bad = config_to_values(load_config(None, DEMO + [f"model.path={tmp_path / 'gone'}"]))
    assert train_tab.memory_estimate(ctx, None, bad).startswith(
        "**Problem:** No memory estimate: model.path = ")
    slow = estimate_view.run_estimate(dirs.base_config, [], timeout=0.01)
    assert slow.startswith("**Problem:** No memory estimate: The memory estimate took longer")


def test_the_estimate_follows_edits_of_the_settings_it_depends_on(tmp_path):
    """Each memory setting's edit re-runs the estimate (the newest edit only)."""
    from gui.app import build_ui
    from gui.datadir import DataDirs
    from gui.jobs import JobRunner
    from gui.train_tab import MEMORY_KEYS

    dirs = DataDirs(tmp_path / "data").create()
    config = build_ui(dirs, JobRunner(dirs.jobs)).get_config_file()
    elem = {c["id"]: c.get("props", {}).get("elem_id") for c in config["components"]}
    triggers = {}
    for dependency in config["dependencies"]:
        if "train-estimate-view" in [elem.get(o) for o in dependency["outputs"]]:
            for target, event in dependency["targets"]:
                triggers[(elem.get(target), event)] = dependency["trigger_mode"]
    for key in MEMORY_KEYS:
        assert triggers.get(("cfg-" + key.replace(".", "-"), "input")) == "always_last", key
    assert triggers[("train-estimate", "click")] == "once"
