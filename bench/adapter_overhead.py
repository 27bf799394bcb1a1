"""Adapter overhead on the SD1.5-architecture U-Net (random weights), CPU.

Times one forward+backward at 32x32 latents, batch 1, for the frozen U-Net
(only the input requires grad) and with LoRA r16, LoCon and LoHa attached;
then measures what one LoHa training step on a 1280x1280 Linear keeps for
backward, against the naive autograd formula.

    python -m bench.adapter_overhead [--repeats N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from networks.loha import LoHaModule
from networks.network import AdapterNetwork, NetworkSpec
from trainer.sd15_config import build_sd15_from_config

CASES = {
    "lora r16": NetworkSpec("lora", rank=16, alpha=8, train_text_encoder=False),
    "locon r16/c8": NetworkSpec("locon", rank=16, alpha=8, conv_rank=8, conv_alpha=4),
    "loha r8/c4": NetworkSpec("loha", rank=8, alpha=4, conv_rank=4, conv_alpha=2),
}


def make_step(unet):
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 32, 32, generator=generator, requires_grad=True)
    text = torch.randn(1, 77, 768, generator=generator)
    timestep = torch.tensor([500])

    def step() -> float:
        start = time.perf_counter()
        unet(latents, timestep, text).sample.float().square().mean().backward()
        return time.perf_counter() - start

    return step


def interleaved_ratios(unet, networks: dict, repeats: int) -> tuple[float, dict[str, float]]:
    """Median frozen step time and median per-round ratios. Each round times the
    frozen U-Net and then every adapter right after it, so slow drifts of a shared
    machine hit both sides of a ratio alike."""
    step = make_step(unet)
    step()  # warm-up: allocator, kernels
    frozen_times, ratios = [], {label: [] for label in networks}
    for _ in range(repeats):
        frozen = step()
        frozen_times.append(frozen)
        for label, network in networks.items():
            network.attach()
            ratios[label].append(step() / frozen)
            network.detach()
    return statistics.median(frozen_times), {k: statistics.median(v) for k, v in ratios.items()}


def saved_bytes(step, resident: list[torch.Tensor]) -> int:
    """Bytes autograd keeps for backward during `step()`, not counting tensors
    that stay in memory anyway (parameters, the input): the step's own peak."""
    total = 0
    already = {t.data_ptr() for t in resident}

    def pack(t):
        nonlocal total
        if t.data_ptr() not in already:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    loss.backward()
    return total


def loha_memory(rank: int = 8) -> dict[str, float]:
    torch.manual_seed(0)
    base = nn.Linear(1280, 1280).requires_grad_(False)
    module = LoHaModule("lora_unet_bench", base, rank=rank, alpha=rank)
    nn.init.normal_(module.hada_w2_a, std=0.1)
    module.attach()
    # Inside a U-Net the input needs a gradient too; count what that keeps as well.
    x = torch.randn(1, 64, 1280, requires_grad=True)
    resident = [x, base.weight, *module.parameters()]
    ours = saved_bytes(lambda: base(x).square().mean(), resident)
    p = dict(module.named_parameters())

    def naive():
        delta = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])
        return (
            (nn.functional.linear(x, base.weight) + nn.functional.linear(x, delta)).square().mean()
        )

    module.detach()
    full = 1280 * 1280 * 4
    return {
        "ours_MiB": ours / 2**20,
        "naive_MiB": saved_bytes(naive, resident) / 2**20,
        "full_MiB": full / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sd = build_sd15_from_config(seed=0)
    unet = sd.unet.requires_grad_(False)
    networks = {label: AdapterNetwork.create(spec, unet, None) for label, spec in CASES.items()}
    frozen, ratios = interleaved_ratios(unet, networks, args.repeats)
    print(f"frozen U-Net fwd+bwd: {frozen:.3f} s (median of {args.repeats})")
    for label, ratio in ratios.items():
        count = len(networks[label].unet_adapters)
        print(f"{label:14s} {ratio:.3f}x  ({count} modules)")
    memory = loha_memory()
    print(
        "LoHa 1280x1280 Linear, saved for backward: "
        f"ours {memory['ours_MiB']:.2f} MiB, naive autograd {memory['naive_MiB']:.2f} MiB "
        f"(one full-size matrix = {memory['full_MiB']:.2f} MiB)"
    )


if __name__ == "__main__":
    main()
