"""Adapter overhead on the SD1.5-architecture U-Net (random weights), CPU.

Times one forward+backward at 32x32 latents, batch 1, for the frozen U-Net
(only the input requires grad) and with LoRA r16, LoCon, LoHa, LoKr,
LoRA+DoRA and LoCon+DoRA attached; then measures what one training step on a
1280x1280 Linear keeps for backward (LoHa, LoKr, LoRA+DoRA), against the
naive autograd formula that builds the full-size weight.

    python -m bench.adapter_overhead [--repeats N] [--threads T]
        [--cases "lora r16,lokr r16/c8"] [--memory loha,lokr,dora | --memory none]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from networks.algorithms import ALGORITHMS
from networks.base import Dropout
from networks.loha import LoHaModule
from networks.lokr import LoKrModule, kron_delta
from networks.lora import LoRAModule
from networks.network import AdapterNetwork, NetworkSpec
from networks.targets import unet_targets
from trainer.sd15_config import build_sd15_from_config

CASES = {
    "lora r16": NetworkSpec("lora", rank=16, alpha=8, train_text_encoder=False),
    "locon r16/c8": NetworkSpec("locon", rank=16, alpha=8, conv_rank=8, conv_alpha=4),
    "loha r8/c4": NetworkSpec("loha", rank=8, alpha=4, conv_rank=4, conv_alpha=2),
    # LoKr placed like LoCon, factor -1 (LyCORIS' default split near the square root).
    "lokr r16/c8": NetworkSpec("lokr", rank=16, alpha=8, conv_rank=8, conv_alpha=4)
    if "lokr" in ALGORITHMS
    else None,
    "lora r16+dora": NetworkSpec("lora", rank=16, alpha=8, dora=True),
    "locon r16/c8+dora": NetworkSpec(
        "locon", rank=16, alpha=8, conv_rank=8, conv_alpha=4, dora=True
    ),
}
MEMORY = ("loha", "lokr", "dora")


def build_network(label: str, unet) -> AdapterNetwork:
    spec = CASES[label]
    if spec is not None:
        return AdapterNetwork.create(spec, unet, None)
    # LoKr before it is in the registry: the same placement and ranks, built directly.
    assert label.startswith("lokr")
    adapters = [
        LoKrModule(t.lora_name, t.layer, 8 if t.is_conv_kxk else 16, 4 if t.is_conv_kxk else 8,
                   Dropout())
        for t in unet_targets(unet, conv=True)
    ]  # fmt: skip
    return AdapterNetwork(adapters)


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


def interleaved_ratios(
    unet, networks: dict, repeats: int, rounds: dict | None = None
) -> tuple[float, dict[str, float]]:
    """Median frozen step time and median per-round ratios. Each round times the
    frozen U-Net and then every adapter right after it, so slow drifts of a shared
    machine hit both sides of a ratio alike. `rounds`, if given, receives every
    round's ratios per label (for the spread)."""
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
    if rounds is not None:
        rounds.update(ratios, frozen=frozen_times)
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


def _memory(module, naive, x, base) -> dict[str, float]:
    module.attach()
    resident = [x, base.weight, *module.parameters()]
    ours = saved_bytes(lambda: base(x).square().mean(), resident)
    module.detach()
    return {
        "ours_MiB": ours / 2**20,
        "naive_MiB": saved_bytes(naive, resident) / 2**20,
        "full_MiB": base.weight.numel() * base.weight.element_size() / 2**20,
    }


def _linear_and_input():
    torch.manual_seed(0)
    base = nn.Linear(1280, 1280).requires_grad_(False)
    # Inside a U-Net the input needs a gradient too; count what that keeps as well.
    x = torch.randn(1, 64, 1280, requires_grad=True)
    return base, x


def loha_memory(rank: int = 8) -> dict[str, float]:
    base, x = _linear_and_input()
    module = LoHaModule("lora_unet_bench", base, rank=rank, alpha=rank)
    nn.init.normal_(module.hada_w2_a, std=0.1)
    p = dict(module.named_parameters())

    def naive():
        delta = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])
        return (
            (nn.functional.linear(x, base.weight) + nn.functional.linear(x, delta)).square().mean()
        )

    return _memory(module, naive, x, base)


def lokr_memory(rank: int = 16) -> dict[str, float]:
    """LoKr r16, factor -1: 1280 = 32 x 40, w1 (32, 32) full, w2 (40, 40) as rank 16."""
    base, x = _linear_and_input()
    module = LoKrModule("lora_unet_bench", base, rank=rank, alpha=rank / 2)
    params = dict(module.named_parameters())
    nn.init.normal_(params["lokr_w2"] if "lokr_w2" in params else params["lokr_w2_b"], std=0.1)

    def naive():
        w1, w2 = module.factors()
        delta = kron_delta(w1 * module.scale, w2)
        return (
            (nn.functional.linear(x, base.weight) + nn.functional.linear(x, delta)).square().mean()
        )

    result = _memory(module, naive, x, base)
    result["layout"] = {k: tuple(v) for k, v in module.layout.tensor_shapes().items()}
    return result


def dora_memory(rank: int = 16) -> dict[str, float]:
    """LoRA r16 + DoRA (input axis, multiplier 1), against building
    W' = W + s up down and W' * m / ||W'|| (norm detached, as the paper)."""
    base, x = _linear_and_input()
    module = LoRAModule("lora_unet_bench", base, rank=rank, alpha=rank / 2)
    nn.init.normal_(module.lora_up.weight, std=0.1)
    module.enable_dora()
    down, up, m = module.lora_down.weight, module.lora_up.weight, module.dora_scale

    def naive():
        merged = base.weight + module.scale * (up @ down)
        norm = merged.norm(dim=0, keepdim=True).detach()
        weight = merged * (m / (norm + torch.finfo(torch.float32).eps))
        return nn.functional.linear(x, weight, base.bias).square().mean()

    return _memory(module, naive, x, base)


MEMORY_CASES = {
    "loha": ("LoHa r8", loha_memory),
    "lokr": ("LoKr r16", lokr_memory),
    "dora": ("LoRA r16 + DoRA", dora_memory),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument(
        "--cases", default=",".join(CASES), help=f"comma-separated, from: {', '.join(CASES)}"
    )
    parser.add_argument(
        "--memory", default=",".join(MEMORY), help=f"comma-separated from {MEMORY}, or none"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    labels = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in labels if c not in CASES]
    if unknown:
        parser.error(f"unknown case {unknown[0]!r}; choose from {', '.join(CASES)}")
    memory_names = [] if args.memory == "none" else [m.strip() for m in args.memory.split(",")]
    if labels:
        sd = build_sd15_from_config(seed=0)
        unet = sd.unet.requires_grad_(False)
        networks = {label: build_network(label, unet) for label in labels}
        rounds: dict[str, list[float]] = {}
        frozen, ratios = interleaved_ratios(unet, networks, args.repeats, rounds)
        print(
            f"frozen U-Net fwd+bwd: {frozen:.3f} s (median of {args.repeats}; "
            f"{min(rounds['frozen']):.3f}-{max(rounds['frozen']):.3f} s)"
        )
        for label, ratio in ratios.items():
            count = len(networks[label].unet_adapters)
            spread = f"{min(rounds[label]):.3f}-{max(rounds[label]):.3f}x"
            print(f"{label:18s} {ratio:.3f}x  ({count} modules; rounds {spread})")
    for name in memory_names:
        title, measure = MEMORY_CASES[name]
        memory = measure()
        print(
            f"{title} 1280x1280 Linear, saved for backward: "
            f"ours {memory['ours_MiB']:.2f} MiB, naive autograd {memory['naive_MiB']:.2f} MiB "
            f"(one full-size matrix = {memory['full_MiB']:.2f} MiB)"
            + (f" layout {memory['layout']}" if "layout" in memory else "")
        )


if __name__ == "__main__":
    main()
