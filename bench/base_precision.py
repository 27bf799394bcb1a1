"""Weight memory and training-step peak RSS by `model.base_precision`, CPU.

The SD1.5-architecture U-Net and CLIP text encoder (random weights, built from
the shipped configs), LoRA r16 on the U-Net, AdamW, 256x256 (32x32 latents),
batch 1, two steps. Each precision runs in its own child process, so that one
peak cannot hide another: the child's peak RSS (`ru_maxrss`) minus its RSS
after the imports. The weights are made in their stored precision a tensor at a
time (the modules are built on the meta device, their storage allocated
untouched), so the peak is that of the stored model, not of an fp32 model
cast or quantized afterwards, as `trainer.train_setup.load_model` does for a
real checkpoint; quantizing uses the trainer's own `quantize_layers`.

    python -m bench.base_precision [--rows fp32,bf16,fp8,fp8+bf16] [--steps 2] [--threads 1]
    python -m bench.base_precision --device cuda --resolution 512 --batch 8 [--checkpointing]
        # peak VRAM of bf16, fp8+bf16, nf4+bf16 (unmeasured so far)

A row's compute dtype is the trainer's for it: bf16 autocast rows keep their
biases, norms and embeddings in bf16 (train.mixed_precision = "bf16").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

# precision -> (stored dtype name, autocast dtype name or None)
ROWS = {
    "fp32": ("fp32", None),
    "bf16": ("bf16", "bf16"),  # base_precision auto with train.mixed_precision = "bf16"
    "fp8": ("fp8", None),  # fp8 codes, fp32 compute
    "fp8+bf16": ("fp8", "bf16"),  # fp8 codes, bf16 autocast
    "nf4+bf16": ("nf4", "bf16"),  # CUDA only: nf4 Linear weights, fp8 convs
}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(stored: str, compute, device):
    """U-Net and text encoder with weights made directly in their stored form."""
    import torch
    from torch import nn

    from trainer.base_precision import quantize_layers
    from trainer.sd15_config import build_sd15_from_config

    parts = build_sd15_from_config(device="meta")
    generator = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if stored == "bf16" else compute
    for part in (parts.unet, parts.text_encoder):
        part.to_empty(device="cpu")
        for module in part.modules():
            quantized = stored in ("fp8", "nf4") and type(module) in (nn.Linear, nn.Conv2d)
            for name, param in list(module.named_parameters(recurse=False)):
                value = _init(name, param.shape, generator)
                if not (quantized and name == "weight"):
                    value = value.to(dtype)
                module.register_parameter(name, nn.Parameter(value, requires_grad=False))
            if quantized:  # this layer's fp32 weight only, then its codes (on `device`)
                quantize_layers(module, stored, compute, device)
        for name, buffer in part.named_buffers():
            if name.endswith("position_ids"):
                buffer.copy_(torch.arange(buffer.shape[-1]).expand_as(buffer))
        part.to(device)
    return parts.unet, parts.text_encoder


def _init(name: str, shape, generator):
    import torch

    if len(shape) >= 2:
        fan_in = math.prod(shape[1:])
        return torch.randn(shape, generator=generator) / math.sqrt(fan_in)
    return torch.ones(shape) if name == "weight" else torch.zeros(shape)


def child(row: str, args) -> dict:
    import torch

    from networks.network import AdapterNetwork, NetworkSpec
    from trainer.base_precision import weight_bytes

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    after_imports = rss_mb()
    stored, autocast_name = ROWS[row]
    compute = torch.bfloat16 if autocast_name == "bf16" else torch.float32
    unet, text_encoder = build(stored, compute, device)
    if args.checkpointing:
        unet.enable_gradient_checkpointing()
    weights = weight_bytes(unet) + weight_bytes(text_encoder)
    after_build = rss_mb()
    network = AdapterNetwork.create(
        NetworkSpec("lora", rank=16, alpha=8, train_text_encoder=False), unet, text_encoder
    )
    network.to(torch.float32).attach()
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(1)
    side = args.resolution // 8
    ids = torch.randint(0, 49408, (args.batch, 77), generator=generator).to(device)
    latents = torch.randn(args.batch, 4, side, side, generator=generator).to(device)
    timesteps = torch.full((args.batch,), 500, device=device)
    times = []
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_name == "bf16")
    for _ in range(args.steps):
        _synchronize(device)
        start = time.perf_counter()
        with amp:
            with torch.no_grad():
                text = text_encoder(ids).last_hidden_state
            out = unet(latents.to(unet.dtype), timesteps, text.to(unet.dtype)).sample
            loss = (out.float() - latents).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _synchronize(device)
        times.append(time.perf_counter() - start)
    result = {
        "row": row, "device": device.type, "resolution": args.resolution, "batch": args.batch,
        "checkpointing": args.checkpointing, "weight_mb": weights / 2**20,
        "build_rss_mb": after_build - after_imports,
        "step_peak_rss_mb": rss_mb() - after_imports, "step_s": times,
        "loss_finite": bool(torch.isfinite(loss)),
    }  # fmt: skip
    if device.type == "cuda":  # weights and steps: everything lives on the GPU
        result["peak_vram_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", help="default: fp32,bf16,fp8,fp8+bf16 on the CPU, "
                        "bf16,fp8+bf16,nf4+bf16 on CUDA")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    rows = args.rows or ("bf16,fp8+bf16,nf4+bf16" if args.device == "cuda"
                         else "fp32,bf16,fp8,fp8+bf16")
    results = []
    for row in rows.split(","):
        command = [sys.executable, "-m", "bench.base_precision", "--child", row,
                   "--steps", str(args.steps), "--threads", str(args.threads),
                   "--device", args.device, "--resolution", str(args.resolution),
                   "--batch", str(args.batch), *(["--checkpointing"] * args.checkpointing)]
        # A fixed mmap threshold: glibc's adaptive one keeps freed per-layer
        # temporaries on the heap, and the RSS would count them as weights.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
        if done.returncode:
            raise SystemExit(f"{row}: the child failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    print("\n| base | weights (MB) | peak RSS of build (MB) | peak RSS of steps (MB) | "
          "peak VRAM (MB) | step (s) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        vram = f"{r['peak_vram_mb']:.0f}" if "peak_vram_mb" in r else "-"
        print(f"| {r['row']} | {r['weight_mb']:.0f} | {r['build_rss_mb']:.0f} | "
              f"{r['step_peak_rss_mb']:.0f} | {vram} | {r['step_s'][-1]:.2f} |")


if __name__ == "__main__":
    main()
