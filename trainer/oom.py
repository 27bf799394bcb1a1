"""Out of memory in a training step: recognising it, freeing the failed
step, saving the last completed step and the advice the run stops with.

The loop (trainer/train.py) guards each micro-batch's forward and backward:
an out-of-memory error there leaves the adapter, optimizer and schedule as
the last completed optimizer step left them (the update itself never ran), so
that step is saved as a normal resumable state and `OutOfMemoryStop` ends the
run. trainer/oom_retry.py decides whether to retry with less memory.

TRAINER_TEST_OOM is a test hook (tests/test_oom_retry.py), inert unless set:
"step=K" raises torch.OutOfMemoryError in step K's first micro-batch, after
its forward; conditions narrow it so a retry must take the right fallback to
get past: ",unless=gradient_checkpointing", ",unless=fp8" (model.base_precision)
and ",while_batch_above=N" (train.batch_size > N); ",rank=R" fires in one
process of a data-parallel run only (RANK, as torchrun sets it).
"""

from __future__ import annotations

import gc
import os
import traceback
from dataclasses import dataclass

from core.errors import UserError
from core.run_layout import state_dir_name
from trainer.state import restore_rng_states, rng_states

# rng_states too: the loop snapshots the RNG at each step's start for stop_after_oom.
__all__ = ["OutOfMemoryStop", "is_out_of_memory", "injected_oom", "rng_states", "stop_after_oom"]

TEST_HOOK = "TRAINER_TEST_OOM"
_OOM_TEXTS = ("out of memory", "defaultcpuallocator: can't allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(t in str(exc).lower() for t in _OOM_TEXTS)


def injected_oom(config, step: int) -> None:
    """The test hook: the one place TRAINER_TEST_OOM is read."""
    spec = os.environ.get(TEST_HOOK)
    if not spec:
        return
    fields = dict(part.split("=", 1) for part in spec.split(",") if part)
    unknown = set(fields) - {"step", "unless", "while_batch_above", "rank"}
    if unknown or "step" not in fields:
        raise ValueError(f"{TEST_HOOK}={spec!r}: give step=K, optionally unless=... and "
                         f"while_batch_above=N (unknown: {sorted(unknown)})")
    conditions = {"gradient_checkpointing": config.train.gradient_checkpointing,
                  "fp8": config.model.base_precision == "fp8", None: False}
    if fields.get("unless") not in conditions:
        raise ValueError(f"{TEST_HOOK}={spec!r}: unless= takes gradient_checkpointing or fp8")
    unless = conditions[fields.get("unless")]
    above = config.train.batch_size > int(fields.get("while_batch_above", 0))
    here = fields.get("rank", os.environ.get("RANK", "0")) == os.environ.get("RANK", "0")
    if step == int(fields["step"]) and not unless and above and here:
        import torch

        raise torch.OutOfMemoryError(f"{TEST_HOOK}: injected out of memory at step {step}")


def release(exc: BaseException) -> str:
    """Free what the failed step holds (its frames' activations and graph)
    and return the error's first line for the message."""
    import torch

    lines = str(exc).strip().splitlines()
    detail = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    if exc.__traceback__ is not None:
        traceback.clear_frames(exc.__traceback__)
    exc.__traceback__ = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return detail


@dataclass
class Attempt:
    """What the stop needs of the run that ran out of memory."""

    config: object
    failed_step: int  # the step that did not complete (1-based)
    done_step: int  # optimizer steps completed
    resumed: bool  # the run started from a saved state
    world: int  # processes
    losses: list[float]  # the losses of the steps this run completed


class OutOfMemoryStop(UserError):
    """The run ran out of memory in a step; `resume_step` is the state a
    retry continues from (None: nothing was trained, start over)."""

    def __init__(self, message: str, attempt: Attempt, resume_step: int | None, detail: str):
        super().__init__(message)
        self.attempt, self.resume_step, self.detail = attempt, resume_step, detail


def stop_after_oom(exc: BaseException, attempt: Attempt, state_root, read_losses,
                   rng_at_step: dict, save) -> OutOfMemoryStop:
    """Free the failed step, log the steps whose losses are pending, save the
    last completed step's state and return the stop to raise.

    `read_losses()` reads and logs them (raising the divergence error for a
    non-finite one: that, not memory, is then the news); `save()` writes the
    state (False off the main process), with the RNG as it was when the
    failed step began: the failed forward may have drawn from it (adapter
    dropout), and a resumed run must draw what an uninterrupted one would."""
    detail = release(exc)
    read_losses()
    trained = attempt.done_step > 0 or attempt.resumed
    if trained and save and not (state_root / state_dir_name(attempt.done_step)).is_dir():
        restore_rng_states(rng_at_step)  # the run ends here: nothing else draws from it
        save()
    resume_step = attempt.done_step if trained else None
    gc.collect()
    return OutOfMemoryStop(advice(attempt, resume_step, detail, state_root), attempt,
                           resume_step, detail)


def lower_memory_settings(config) -> list[str]:
    """The settings that would lower memory use from this config, as a user would set them."""
    t, d = config.train, config.dataset
    found = []
    if not t.gradient_checkpointing:
        found.append("train.gradient_checkpointing = true")
    if t.batch_size > 1:
        half = max(1, t.batch_size // 2)
        found.append(f"a smaller train.batch_size with a larger train.grad_accum for the same "
                     f"effective batch (e.g. batch_size = {half}, grad_accum = "
                     f"{t.grad_accum * t.batch_size // half})")
    if d.cache_latents == "off":
        found.append('dataset.cache_latents = "memory" (the VAE then encodes once, not every step)')
    if config.model.base_precision not in ("fp8", "nf4"):
        found.append('model.base_precision = "fp8"')
    found.append(f"a lower dataset.resolution (now {d.resolution})")
    return found


def advice(attempt: Attempt, resume_step: int | None, detail: str, state_root,
           tried: str = "") -> str:
    """The one paragraph the run stops with."""
    from trainer.state import latest_progress

    config = attempt.config
    if resume_step is None:
        saved = "Nothing was trained yet, so no state was saved"
        how = "start the run again"
    else:
        saved = f"The state at step {resume_step} is saved in {state_root}: it is resumable"
        how = "continue with --resume"
    if attempt.world > 1:
        newest = latest_progress(state_root)
        at = f"step {newest[1].step}" if newest else "no saved state"
        saved = (f"With {attempt.world} processes the run stops (train.oom_retry applies to "
                 f"one process only) and the launcher ends the other processes; --resume "
                 f"continues from the newest saved state ({at})")
        how = "continue with --resume"
    settings = "; ".join(lower_memory_settings(config))
    retry = "" if tried or config.train.oom_retry else (
        " Or set train.oom_retry = true to let the run retry by itself with less memory.")
    return (f"Out of memory at step {attempt.failed_step} ({detail}).{tried} {saved}. Lower the "
            f"memory the run needs, then {how}: {settings}.{retry}")


def outside_a_step(exc: BaseException, config, state_root) -> UserError:
    """Out of memory elsewhere (loading the model, caching latents, previews,
    the optimizer's update): nothing is saved then, and no retry is safe (an
    update may have been half applied); the newest saved state is the way on."""
    from trainer.state import latest_progress

    detail = release(exc)
    newest = latest_progress(state_root)
    how = (f"continue with --resume from the newest saved state (step {newest[1].step})"
           if newest else "start the run again")
    settings = "; ".join(lower_memory_settings(config))
    return UserError(f"Out of memory outside a step's forward and backward (in loading the "
                     f"model, caching latents, previews or the weights' update: {detail}); "
                     f"train.oom_retry does not retry it. Lower the memory the run needs, then "
                     f"{how}: {settings}; for previews, smaller sample.width and sample.height.")

