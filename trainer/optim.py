"""Optimizers and learning-rate schedules by name. Optional optimizer packages
are imported only when chosen, with a clear message when missing."""

from __future__ import annotations

import importlib

import torch

from core.errors import UserError

# name -> (module, class, pip package or None for torch's own)
OPTIMIZERS = {
    "adamw": ("torch.optim", "AdamW", None),
    "sgd": ("torch.optim", "SGD", None),
    "adamw8bit": ("bitsandbytes.optim", "AdamW8bit", "bitsandbytes"),
    "prodigy": ("prodigyopt", "Prodigy", "prodigyopt"),
    "lion": ("lion_pytorch", "Lion", "lion-pytorch"),
}


# torch's own optimizers run a Python loop over the parameters unless told
# otherwise on a CPU; an adapter has hundreds of small tensors. One AdamW step
# over an SD1.5 LoRA r16's 4.6 M parameters in 384 tensors on the 2-core CPU
# (BENCHMARKS.md): for-loop 100 ms, foreach 45 ms, fused 15 ms, with the
# weights after 10 steps within 4e-7 of the loop's. Fused kernels exist for
# CPU and CUDA tensors.
FAST_PATHS = {"adamw": {"fused": True}, "sgd": {"foreach": True}}


def build_optimizer(name: str, groups: list[dict], weight_decay: float) -> torch.optim.Optimizer:
    module_name, class_name, package = OPTIMIZERS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(
            f"train.optimizer = {name!r} needs the {package} package, which is not installed "
            f'(`.venv/bin/pip install {package}`), or choose train.optimizer = "adamw".'
        ) from exc
    fast = FAST_PATHS.get(name, {})
    return getattr(module, class_name)(groups, weight_decay=weight_decay, **fast)


def build_scheduler(name: str, optimizer, warmup_steps: int, total_steps: int):
    """diffusers' schedules (the ones its training examples use)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps
    )
