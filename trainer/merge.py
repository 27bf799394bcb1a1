"""Fold adapter files into a model's weights, as A1111 and ComfyUI apply them.

W' = W + sum_i weight_i * (alpha_i / rank_i) * delta W_i (how A1111 and
ComfyUI apply a file); a DoRA module contributes weight_i * (W_dora - W)
instead. Deltas add linearly, which is also how the LCM-LoRA report
(arXiv:2311.05556) combines a style LoRA with an LCM-LoRA without retraining.
The per-layer rule is `networks.merge`, the same one `AdapterModule.merge`
uses. Merged weights cost nothing per sampling step, unlike forward hooks.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from core.errors import UserError


def load_fitting_network(sd, path: Path):
    """`load_network`, with shape mismatches (a LoRA for SD2 or SDXL, or for a
    model of other widths) reported as a `UserError`."""
    from networks.export import load_network

    try:
        network = load_network(path, sd.unet, sd.text_encoder)
    except RuntimeError as exc:
        # Copying a file tensor into a module of another shape fails here.
        raise UserError(
            f"{path} does not fit this base model: a tensor's shape differs from the layer it "
            f"adapts ({exc}). Use a LoRA trained for this SD 1.x model family."
        ) from exc
    bad = [name for name, p in network.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise UserError(
            f"{path} holds NaN/Inf values (e.g. {bad[0]}); merging it would break the model. "
            "The training that wrote it diverged: use another file."
        )
    return network


@torch.no_grad()
def merge_adapters(sd, adapters: Sequence[tuple[str | os.PathLike, float]]) -> None:
    """Add each (file, weight)'s scaled delta into `sd`'s U-Net and text encoder
    weights, in place. Deep-copy `sd` first to keep the base weights.

    Every file is loaded and checked before any weight changes, so a file that
    does not fit leaves the model untouched. No hooks stay behind.
    """
    networks = []
    for path, weight in adapters:
        network = load_fitting_network(sd, Path(path))
        network.set_multiplier(float(weight))
        networks.append((Path(path), network))

    from networks.merge import merged_layer_weight

    # Per layer, the changes of all files are summed first so that an fp16
    # model is rounded once, and only one layer's delta is held at a time.
    by_layer: dict[str, list] = {}
    for path, network in networks:
        for adapter in network.adapters:
            by_layer.setdefault(adapter.lora_name, []).append((path, adapter))
    for lora_name, entries in by_layer.items():
        weight = entries[0][1].base.weight
        try:
            merged = merged_layer_weight(weight, [adapter for _, adapter in entries])
        except ValueError:
            files = ", ".join(str(path) for path, _ in entries)
            raise UserError(
                f"Merging {files} overflows {lora_name} (NaN/Inf in the merged weight); "
                "lower the LoRA weights."
            ) from None
        weight.copy_(merged)
    for _, network in networks:
        network.detach()
