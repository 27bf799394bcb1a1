"""`train.oom_retry`: after out of memory in a step, train on from the saved
state with less memory, one fallback at a time, in this process.

The fallbacks, each computed from the settings in use (so one already set is
skipped): (1) gradient checkpointing on; (2) the batch divided by its
smallest prime factor p (halved when even) with grad_accum times p, so
batch_size * grad_accum, the effective batch, stays the same, repeated while
the batch is above 1; (3) `model.base_precision = "fp8"` (not with
train.compile, which fp8 refuses). With none left the run stops with the
advice of trainer/oom.py.

A smaller batch resumes at the same point of the epoch: the data position
`Position(epoch, batch)` counts batches of the old size, and batch b of size
B becomes batch b * p of size B / p. The sampler (datasets_tools/sampler.py)
cuts each bucket's shuffled pool into the same order at every batch size, so
its batches of B / p are the parts of those of B, but it interleaves them in
an order that depends on their number: the rest of that epoch is drawn from
the new order (as many samples as the old rest when every bucket's pool
divides by B, a few fewer otherwise; not exactly the same ones), and the
epoch ends where it would have. tests/test_oom_retry.py checks both. Steps
stay optimizer steps: none is lost or repeated.

Several processes never retry (an out-of-memory error in one of them leaves
the others waiting in a collective): the run stops with the advice.
"""

from __future__ import annotations

import gc
import json
import traceback
from dataclasses import dataclass, field

from core.atomic import atomic_write_text
from core.run_layout import state_dir_name
from trainer.oom import OutOfMemoryStop, advice, is_out_of_memory, outside_a_step


@dataclass(frozen=True)
class Fallback:
    change: str  # for people: the log line, status.json, the GUI
    overrides: dict = field(default_factory=dict)  # "section.key" -> value
    batch_factor: int = 1  # the old batch is this many new ones


def next_fallback(config) -> Fallback | None:
    """The first fallback not yet in use, or None when all are."""
    t = config.train
    if not t.gradient_checkpointing:
        return Fallback("gradient checkpointing on", {"train.gradient_checkpointing": True})
    if t.batch_size > 1:
        p = _smallest_prime_factor(t.batch_size)
        batch, accum = t.batch_size // p, t.grad_accum * p
        return Fallback(f"batch_size {t.batch_size} -> {batch} and grad_accum {t.grad_accum} "
                        f"-> {accum} (the same effective batch)",
                        {"train.batch_size": batch, "train.grad_accum": accum}, p)
    # Not with train.compile, which cannot trace quantized weights (trainer/base_precision.py).
    if config.model.base_precision not in ("fp8", "nf4") and not t.compile:
        return Fallback('model.base_precision = "fp8"', {"model.base_precision": "fp8"})
    return None


def retry_policy(config) -> list[Fallback]:
    """Every fallback the run would take, in order ([] without train.oom_retry):
    what trainer/run_plan.py shows and `run_with_retry` walks."""
    steps = []
    while config.train.oom_retry and (fallback := next_fallback(config)) is not None:
        steps.append(fallback)
        config = applied(config, fallback)
    return steps


def applied(config, fallback: Fallback):
    from trainer.config import TrainConfig

    data = config.model_dump()
    for key, value in fallback.overrides.items():
        section, name = key.split(".")
        data[section][name] = value
    return TrainConfig.model_validate(data)


def run_with_retry(config, resume: bool = False, stop_at_step: int | None = None):
    """trainer.train.run, retried after out of memory as train.oom_retry says."""
    from trainer.train import run

    retries: list[dict] = []
    if resume:
        config, retries = carried_over(config)
    earlier: list[float] = []  # the losses of the steps failed attempts completed
    while True:
        try:
            result = run(config, resume=resume, stop_at_step=stop_at_step, oom_retries=retries)
        except OutOfMemoryStop as stop:
            fallback = _retry_or_raise(stop, config, retries)
            attempt, resume_step = stop.attempt, stop.resume_step
            earlier += attempt.losses
            _forget(stop)  # the failed run's model and data, before the next one loads
            del stop
            gc.collect()
            print(f"out of memory at step {attempt.failed_step}: retrying from step "
                  f"{resume_step or 0} with {fallback.change}", flush=True)
            config = applied(config, fallback)
            resume = resume_step is not None
            if resume and fallback.batch_factor > 1:
                _rescale_position(_state_root(config), resume_step, fallback.batch_factor)
            continue
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            raise outside_a_step(exc, config, _state_root(config)) from None
        result.oom_retries, result.losses = list(retries), earlier + result.losses
        return result


def _retry_or_raise(stop: OutOfMemoryStop, config, retries: list[dict]) -> Fallback:
    if not settle(stop, retries):
        raise stop
    fallback = next_fallback(config)
    retries.append({"step": stop.attempt.failed_step, "from_step": stop.resume_step or 0,
                    "change": fallback.change, "set": fallback.overrides,
                    "was": {key: _value(config, key) for key in fallback.overrides}})
    return fallback


def carried_over(config) -> tuple[object, list[dict]]:
    """--resume of a run whose retries lowered its settings (the GUI's Resume
    passes the original ones): the retries' settings again, as long as the
    config still has the values they replaced (one changed by hand wins), so
    the saved data position keeps the batch size it counts in. The retries
    stay listed in status.json: they are the run's history."""
    from core.run_lock import read_status

    status = read_status(_state_root(config).parent) or {}
    carried = []
    for retry in status.get("oom_retries") or []:
        was, chosen = retry.get("was") or {}, retry.get("set") or {}
        if not chosen or any(_value(config, key) != value for key, value in was.items()):
            break
        config = applied(config, Fallback(retry.get("change", ""), chosen))
        carried.append(retry)
    if carried:
        print(f"resuming with the settings of the run's retries after out of memory: "
              f"{set_arguments(carried)}", flush=True)
    return config, carried


def _value(config, key: str):
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


def settle(stop: OutOfMemoryStop, retries: list[dict]) -> bool:
    """Whether the run goes on after `stop` (status.json then says so, not
    "failed"); when not, after retries, the stop's message says which were
    used. trainer/run_guard.py asks before it writes the status."""
    attempt = stop.attempt
    config = attempt.config
    if not config.train.oom_retry or attempt.world > 1:
        return False
    if next_fallback(config) is not None:
        return True
    tried = "; ".join(r["change"] for r in retries) or "none was left"
    used = f" (now {set_arguments(retries)})" if retries else ""
    stop.args = (advice(attempt, stop.resume_step, stop.detail, _state_root(config),
                        tried=f" train.oom_retry has used every fallback{used}: {tried}."),)
    return False


def set_arguments(retries: list[dict]) -> str:
    """The settings the retries chose, as `--set` arguments: what --resume
    needs to continue with them (the run folder's config.toml has them too)."""
    chosen: dict = {}
    for retry in retries:
        chosen.update(retry["set"])
    return " ".join(f"--set {key}={str(value).lower() if isinstance(value, bool) else value}"
                    for key, value in chosen.items())


def _forget(stop: BaseException) -> None:
    """Drop the frames the stop's traceback keeps alive: they hold the whole
    failed run (model, optimizer, data)."""
    for exc in (stop, stop.__context__, stop.__cause__):
        if exc is not None and exc.__traceback__ is not None:
            traceback.clear_frames(exc.__traceback__)
            exc.__traceback__ = None
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _state_root(config):
    from trainer.config import output_dir
    from trainer.run_outputs import RunOutputs

    return RunOutputs(output_dir(config), config.output.name).state_root


def _rescale_position(state_root, step: int, factor: int) -> None:
    """The saved data position in batches of the new size (see the module's doc)."""
    path = state_root / state_dir_name(step) / "progress.json"
    progress = json.loads(path.read_text())
    progress["batch"] *= factor
    atomic_write_text(path, json.dumps(progress))


def _smallest_prime_factor(n: int) -> int:
    return next(p for p in range(2, n + 1) if n % p == 0)
