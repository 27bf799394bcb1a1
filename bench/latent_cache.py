"""Latent-cache throughput on the SD1.5-architecture VAE (random weights), CPU.

Builds AutoencoderKL with the SD1.5 shape (block_out_channels 128/256/512/512,
2 layers per block, 4 latent channels, 32 norm groups), then times, at
512x512 and batch 1: encoding N images into an empty disk cache, a second
pass over the same images (every entry read back and verified, nothing
encoded), and the VAE identity hash used in the cache key.

    python -m bench.latent_cache [--images N] [--threads T]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

from datasets_tools import LatentCache, LatentRequest, compute_crop, module_identity


def sd15_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
        sample_size=512,
    ).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    vae = sd15_vae()
    params = sum(p.numel() for p in vae.parameters())
    start = time.perf_counter()
    vae_id = module_identity(vae)
    id_seconds = time.perf_counter() - start
    print(f"VAE: {params / 1e6:.1f} M parameters, identity hash {id_seconds:.2f} s, "
          f"torch threads {torch.get_num_threads()}")

    with tempfile.TemporaryDirectory(prefix="bench-latents-") as tmp:
        root = Path(tmp)
        rng = np.random.default_rng(0)
        requests = []
        for i in range(args.images + 1):  # +1: warm-up image
            path = root / f"img{i}.jpg"
            Image.fromarray(rng.integers(0, 256, (640, 768, 3), dtype=np.uint8)).save(path)
            requests.append(LatentRequest(path, compute_crop((768, 640), (512, 512))))
        cache_dir = root / "cache"
        LatentCache(vae, vae_id, cache_dir).build(requests[:1])  # warm-up: kernels, allocator

        start = time.perf_counter()
        stats = LatentCache(vae, vae_id, cache_dir).build(requests[1:])
        cold = time.perf_counter() - start
        assert stats.encoded == args.images
        start = time.perf_counter()
        stats = LatentCache(vae, vae_id, cache_dir).build(requests[1:])
        warm = time.perf_counter() - start
        assert stats.encoded == 0 and stats.reused == args.images
        entry_kb = np.mean([p.stat().st_size for p in cache_dir.glob("*.safetensors")]) / 1024

    print(f"encode + write, 512x512 batch 1: {cold / args.images:.2f} s/image "
          f"({args.images / cold:.2f} images/s, {args.images} images)")
    print(f"second run (read + verify, no encode): {warm / args.images * 1000:.1f} ms/image "
          f"({args.images / warm:.0f} images/s)")
    print(f"cache entry: {entry_kb:.0f} KiB (4x64x64 float32 latent + metadata)")


if __name__ == "__main__":
    main()
