"""LCM preview vs CFG preview on the SD1.5-architecture model (random weights), CPU.

A 4-step LCM preview (guidance 1: no CFG, one U-Net call per step) against a
20-step Euler-ancestral preview with guidance 7 (CFG: a batch of two per
step), one 512x512 image each, through `trainer.sampling.generate`, the path
`python -m trainer sample` takes. Before the LCM preview, an SD1.5-size
LCM-LoRA (LoCon rank 64 on the U-Net, the published layout) is merged with
`merge_adapters`, timed on its own: a one-off cost, nothing per step.

The weights are random, so the images are noise; only the time matters.
Forward hooks also time the U-Net and the decoder, so the report shows
where a preview's time goes. `--decoder taesd` decodes both previews with
the TAESD architecture (`sample.preview_decoder`, random weights here)
instead of the SD VAE.

    python -m bench.lcm_preview_speed [--size 512] [--threads N] [--decoder taesd]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch

from networks.export import export_network
from networks.metadata import ExportInfo
from networks.network import AdapterNetwork, NetworkSpec
from trainer.merge import merge_adapters
from trainer.model_loading import SDModel
from trainer.sampling import SampleSettings, generate
from trainer.sd15_config import build_sd15_from_config, load_sd15_config
from trainer.tokenizer import load_offline_tokenizer

LCM_LORA = NetworkSpec(
    "locon", rank=64, alpha=64, conv_rank=64, conv_alpha=64, train_text_encoder=False
)
CFG_PREVIEW = dict(sampler="euler_a", steps=20, guidance=7.0)
LCM_PREVIEW = dict(sampler="lcm", steps=4, guidance=1.0)


class Stopwatch:
    """Seconds and calls spent in a module's forward, via hooks."""

    def __init__(self, module: torch.nn.Module):
        self.seconds, self.calls = 0.0, 0
        module.register_forward_pre_hook(self._start)
        module.register_forward_hook(self._stop)

    def _start(self, module, args):
        self._started = time.perf_counter()

    def _stop(self, module, args, output):
        self.seconds += time.perf_counter() - self._started
        self.calls += 1

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


def random_sd15() -> SDModel:
    from diffusers import DDPMScheduler

    parts = build_sd15_from_config(with_vae=True, seed=0)
    scheduler_config = load_sd15_config("scheduler")
    return SDModel(
        unet=parts.unet.eval(),
        vae=parts.vae.eval(),
        text_encoder=parts.text_encoder.eval(),
        tokenizer=load_offline_tokenizer(),
        noise_scheduler=DDPMScheduler.from_config(scheduler_config),
        prediction_type="epsilon",
        source=Path("random SD1.5 weights"),
        scheduler_config=scheduler_config,
    )


def random_taesd(folder: Path) -> Path:
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    AutoencoderTiny().save_pretrained(folder)
    return folder


def settings(size: int, **preview) -> SampleSettings:
    return SampleSettings(
        prompts=("a photo of a cat, best quality",),
        negative_prompt="blurry, low quality",
        width=size,
        height=size,
        seed=0,
        **preview,
    )


def merge_random_lcm_lora(sd: SDModel) -> tuple[float, int]:
    """Seconds to merge an SD1.5-size LCM-LoRA file, and its parameter count."""
    network = AdapterNetwork.create(LCM_LORA, sd.unet, None)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in network.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 1e-3)
    count = sum(p.numel() for p in network.parameters())
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "lcm-lora.safetensors"
        export_network(network, path, ExportInfo())
        started = time.perf_counter()
        merge_adapters(sd, [(path, 1.0)])
        return time.perf_counter() - started, count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--decoder", choices=("vae", "taesd"), default="vae")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # random weights: NaN pixels in the PNG cast
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    print(f"load average at start: {os.getloadavg()}")

    started = time.perf_counter()
    sd = random_sd15()
    print(f"built random SD1.5 model in {time.perf_counter() - started:.1f} s")
    decoder = ""
    if args.decoder == "taesd":
        from trainer.preview_decoder import load_preview_decoder

        decoder = str(random_taesd(Path(tempfile.mkdtemp()) / "taesd"))
        decoder_module = load_preview_decoder(decoder).decoder
    else:
        decoder_module = sd.vae.decoder
    unet_time, decoder_time = Stopwatch(sd.unet), Stopwatch(decoder_module)
    # Warm-up at a tiny size: allocator and kernel selection, not counted.
    for preview in (CFG_PREVIEW, LCM_PREVIEW):
        generate(sd, settings(64, decoder=decoder, **{**preview, "steps": 1}))

    def timed(label: str, preview: dict) -> tuple[float, float]:
        unet_time.reset()
        decoder_time.reset()
        started = time.perf_counter()
        generate(sd, settings(args.size, decoder=decoder, **preview))
        wall = time.perf_counter() - started
        print(
            f"{label}: {wall:.1f} s wall, U-Net {unet_time.seconds:.1f} s in "
            f"{unet_time.calls} calls, {args.decoder} decoder {decoder_time.seconds:.1f} s"
        )
        return wall, unet_time.seconds

    cfg_wall, cfg_unet = timed("euler_a, 20 steps, guidance 7 (CFG)", CFG_PREVIEW)
    merge_seconds, count = merge_random_lcm_lora(sd)
    print(f"LCM-LoRA merge, one-off ({count / 1e6:.1f} M parameters): {merge_seconds:.1f} s")
    lcm_wall, lcm_unet = timed("LCM, 4 steps, guidance 1 (no CFG)", LCM_PREVIEW)
    print(f"wall-time ratio (CFG / LCM): {cfg_wall / lcm_wall:.2f}x (goal >= 8x)")
    print(f"U-Net-time ratio (CFG / LCM): {cfg_unet / lcm_unet:.2f}x")
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
