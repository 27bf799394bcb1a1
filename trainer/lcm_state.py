"""The adapter weights a training state keeps, with LCM's EMA target when
distillation uses one (`lcm.target_ema`), and their restoring on resume."""

from __future__ import annotations

import torch

from core.errors import UserError
from trainer.lcm import EmaTarget


def training_weights(network, lcm_target) -> dict[str, torch.Tensor]:
    """What a training state keeps: the adapter, and the EMA target if any."""
    weights = network.state_dict()
    return weights | lcm_target.state_dict() if lcm_target is not None else weights


def restore_weights(network, lcm_target, saved: dict[str, torch.Tensor], state_root) -> None:
    network.load_state_dict(
        {key: value for key, value in saved.items() if not key.startswith(EmaTarget.PREFIX)}
    )
    if lcm_target is None:
        return
    try:
        lcm_target.load_state_dict(saved)
    except KeyError:
        raise UserError(
            f"--resume: the training state in {state_root} was saved without an EMA target "
            "(lcm.target_ema was 0 then); resume with lcm.target_ema = 0, or start afresh "
            "without --resume."
        ) from None
