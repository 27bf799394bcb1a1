"""Out of memory in a training step: the run saves the last completed step and
stops with advice, or (train.oom_retry) retries by itself with less memory,
continuing exactly where it was. The OOM is injected by the TRAINER_TEST_OOM
test hook (trainer/oom.py) inside the step's forward."""

from __future__ import annotations

import gc
import json
import os
import socket
import subprocess
import sys
import tomllib
import weakref
from pathlib import Path

import pytest
import torch

from core.errors import UserError
from core.run_lock import process_start_time, read_status
from trainer.config import PRESETS_DIR, load_config
from trainer.oom import (
    TEST_HOOK,
    Attempt,
    OutOfMemoryStop,
    advice,
    injected_oom,
    is_out_of_memory,
    release,
)
from trainer.oom_retry import retry_policy, run_with_retry, settle

REPO = Path(__file__).resolve().parents[1]
PRESET = PRESETS_DIR / "cpu-demo.toml"
# The demo: 9 images x 4 repeats = 36 samples, 9 batches of 4 per epoch.
BASE = {"train.batch_size": 4, "train.steps": 4, "sample.every_n_steps": 0,
        "train.scheduler": "constant", "output.save_precision": "fp32"}


def config_of(out: Path, **overrides):
    values = {**BASE, "output.dir": str(out), **overrides}
    return load_config(PRESET, [f"{k}={json.dumps(v)}" for k, v in values.items()])


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def saved_progress(out: Path) -> dict:
    newest = sorted((out / "state").glob("state-*"))[-1]
    return json.loads((newest / "progress.json").read_text())


def used_config(out: Path) -> dict:
    return tomllib.loads((out / "config.toml").read_text())


@pytest.fixture(autouse=True)
def _threads(one_torch_thread, monkeypatch):
    monkeypatch.delenv(TEST_HOOK, raising=False)


def test_checkpointing_retry_resumes_exactly_and_the_gui_shows_it(tmp_path, monkeypatch, capsys):
    # Adapter dropout draws from the global RNG, in the failed forward too.
    plain = tmp_path / "plain"
    run_with_retry(config_of(plain, **{"network.dropout": 0.2}))
    monkeypatch.setenv(TEST_HOOK, "step=3,unless=gradient_checkpointing")
    out = tmp_path / "retried"
    result = run_with_retry(config_of(out, **{"train.oom_retry": True, "network.dropout": 0.2}))

    assert result.steps_done == 4 and not result.stopped_early
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]
    # Checkpointing recomputes the same forward (with the same dropout): the resumed
    # run's losses are the uninterrupted run's, which only an exact resume (weights,
    # optimizer, RNG as at the failed step's start, data) gives.
    torch.testing.assert_close([m["loss"] for m in metrics(out)],
                               [m["loss"] for m in metrics(plain)], rtol=1e-5, atol=1e-6)
    assert result.losses == pytest.approx([m["loss"] for m in metrics(out)])
    assert used_config(out)["train"]["gradient_checkpointing"] is True
    assert "out of memory at step 3: retrying from step 2 with gradient checkpointing on" in (
        capsys.readouterr().out)
    status = read_status(out)
    assert status["state"] == "done"
    assert status["oom_retries"] == [{"step": 3, "from_step": 2, "change":
                                      "gradient checkpointing on",
                                      "set": {"train.gradient_checkpointing": True},
                                      "was": {"train.gradient_checkpointing": False}}]

    from gui.job_record import Job, Status
    from gui.monitor import _status

    pid = os.getpid()
    job = Job(1, "cpu-demo", str(PRESET), [], str(out), status=Status.DONE, message="Finished.",
              pid=pid, pid_start=process_start_time(pid), host=socket.gethostname())
    assert "Out of memory at step 3: retried from step 2 with gradient checkpointing on." in (
        _status(job))


def test_halved_batch_keeps_the_effective_batch_and_the_place_in_the_epoch(tmp_path, monkeypatch):
    # Step 8 fails with 7 of the epoch's 9 batches of 4 done: the retry goes on with
    # batches of 2 from batch 14 of 18, crosses into epoch 1 at step 10 as an
    # uninterrupted run does (batch 9 of 4 is its first of epoch 1), and ends at
    # batch 2 of 2 of epoch 1, where that run is at batch 1 of 4. Stopped after
    # step 9, a --resume with the original settings (the GUI's Resume) goes on
    # with the retry's, in whose batches the saved position counts.
    monkeypatch.setenv(TEST_HOOK, "step=8,while_batch_above=2")
    out = tmp_path / "retried"
    original = config_of(out, **{"train.steps": 10, "train.oom_retry": True,
                                 "train.gradient_checkpointing": True})
    stopped = run_with_retry(original, stop_at_step=9)
    assert stopped.stopped_early and stopped.steps_done == 9
    assert saved_progress(out)["batch"] == 18  # 14 + 2 x 2: the end of epoch 0
    result = run_with_retry(original, resume=True)

    assert result.steps_done == 10
    assert [(r["step"], r["from_step"], r["change"]) for r in result.oom_retries] == [
        (8, 7, "batch_size 4 -> 2 and grad_accum 1 -> 2 (the same effective batch)")]
    assert [m["step"] for m in metrics(out)] == list(range(1, 11))
    assert [m["epoch"] for m in metrics(out)] == [0] * 9 + [1]
    used = used_config(out)["train"]
    assert (used["batch_size"], used["grad_accum"]) == (2, 2)
    assert saved_progress(out) == {"step": 10, "epoch": 1, "batch": 2, "losses_since_start": 0}

    from safetensors import safe_open

    with safe_open(str(result.final_file), "pt") as file:
        meta = file.metadata()
    assert (meta["ss_batch_size_per_device"], meta["ss_gradient_accumulation_steps"]) == ("2", "2")


def test_the_sampler_cuts_the_same_parts_at_half_the_batch_in_another_order() -> None:
    # What the halved batch's resume rule (trainer/oom_retry.py) rests on.
    from datasets_tools.sampler import BucketBatchSampler

    sizes, repeats = [(64, 64)] * 9, [4] * 9
    full = BucketBatchSampler(sizes, repeats, 4, seed=42).batches(0)
    half = BucketBatchSampler(sizes, repeats, 2, seed=42).batches(0)
    parts = [b.items[i:i + 2] for b in full for i in (0, 2)]
    assert sorted(b.items for b in half) == sorted(parts)
    assert [b.items for b in half] != parts


def test_without_oom_retry_the_cli_stops_with_advice_and_resume_finishes(tmp_path):
    out = tmp_path / "run"
    args = [f"{k}={json.dumps(v)}" for k, v in
            {**BASE, "output.dir": str(out), "dataset.cache_latents": "off"}.items()]
    env = {**os.environ, TEST_HOOK: "step=3", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "trainer", "train", str(PRESET),
                           *[a for s in args for a in ("--set", s)]],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("error: Out of memory at step 3 (OutOfMemoryError: ")
    assert f"The state at step 2 is saved in {out / 'state'}: it is resumable" in error
    for setting in ("train.gradient_checkpointing = true", "train.batch_size", "train.grad_accum",
                    'dataset.cache_latents = "memory"', 'model.base_precision = "fp8"',
                    "dataset.resolution (now 64)", "continue with --resume",
                    "set train.oom_retry = true"):
        assert setting in error, setting
    status = read_status(out)
    assert status["state"] == "failed" and status["error"] == error.removeprefix("error: ")
    assert [m["step"] for m in metrics(out)] == [1, 2]

    result = run_with_retry(load_config(PRESET, args), resume=True)
    assert result.steps_done == 4 and result.final_file.is_file()
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]


def test_when_every_fallback_is_used_the_run_stops_saying_so(tmp_path, monkeypatch):
    monkeypatch.setenv(TEST_HOOK, "step=2")  # whatever the settings
    out = tmp_path / "run"
    config = config_of(out, **{"train.oom_retry": True, "train.batch_size": 2,
                               "train.gradient_checkpointing": True, "train.steps": 2})
    with pytest.raises(OutOfMemoryStop) as stopped:
        run_with_retry(config)
    message = str(stopped.value)
    assert message.startswith("Out of memory at step 2 (OutOfMemoryError: ")
    assert ("train.oom_retry has used every fallback (now --set train.batch_size=1 --set "
            "train.grad_accum=2 --set model.base_precision=fp8): batch_size 2 -> 1 and "
            'grad_accum 1 -> 2 (the same effective batch); model.base_precision = "fp8".') in (
        message)
    assert "The state at step 1 is saved" in message and "dataset.resolution" in message
    status = read_status(out)
    assert status["state"] == "failed" and status["error"] == message
    assert [r["from_step"] for r in status["oom_retries"]] == [1, 1]
    assert [m["step"] for m in metrics(out)] == [1]
    assert used_config(out)["model"]["base_precision"] == "fp8"


def test_an_oom_at_the_first_step_starts_over_with_the_failed_run_freed(tmp_path, monkeypatch):
    from trainer import train_setup

    unets, alive_at_retry = [], []
    load_model = train_setup.load_model

    def loading(config, device):
        if unets:  # the retry: nothing may still hold the failed attempt's model
            gc.collect()
            alive_at_retry.append(unets[0]() is not None)
        sd = load_model(config, device)
        unets.append(weakref.ref(sd.unet))
        return sd

    monkeypatch.setattr(train_setup, "load_model", loading)
    monkeypatch.setenv(TEST_HOOK, "step=1,unless=gradient_checkpointing")
    out = tmp_path / "run"
    result = run_with_retry(config_of(out, **{"train.oom_retry": True, "train.steps": 2}))
    assert result.steps_done == 2
    assert alive_at_retry == [False]
    assert result.oom_retries[0]["from_step"] == 0
    assert [m["step"] for m in metrics(out)] == [1, 2]
    attempt = Attempt(config_of(out), 1, 0, resumed=False, world=1, losses=[])
    message = advice(attempt, None, "OutOfMemoryError: x", out / "state")
    assert "Nothing was trained yet, so no state was saved. Lower the memory the run needs, " \
        "then start the run again: train.gradient_checkpointing = true; " in message


def test_out_of_memory_outside_a_step_stops_cleanly_from_the_newest_state(tmp_path, monkeypatch):
    def previews(config, sd, network, outputs, step):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    monkeypatch.setattr("trainer.train.write_previews", previews)
    out = tmp_path / "run"
    config = config_of(out, **{"train.oom_retry": True, "sample.every_n_steps": 2,
                               "output.save_every_n_steps": 1})
    with pytest.raises(UserError) as stopped:
        run_with_retry(config)
    message = str(stopped.value)
    assert message.startswith("Out of memory outside a step's forward and backward (in loading "
                              "the model, caching latents, previews or the weights' update: "
                              "OutOfMemoryError: CUDA out of memory. Tried to allocate 1.00 GiB)")
    assert "continue with --resume from the newest saved state (step 1)" in message
    assert "sample.width" in message and "train.gradient_checkpointing = true" in message
    assert read_status(out)["state"] == "failed"


def test_the_policy_keeps_the_effective_batch_and_is_what_the_plan_shows(tmp_path) -> None:
    config = config_of(tmp_path, **{"train.oom_retry": True, "train.grad_accum": 3,
                                    "train.batch_size": 12})
    steps = retry_policy(config)
    assert [s.overrides for s in steps] == [
        {"train.gradient_checkpointing": True},
        {"train.batch_size": 6, "train.grad_accum": 6},
        {"train.batch_size": 3, "train.grad_accum": 12},
        {"train.batch_size": 1, "train.grad_accum": 36},
        {"model.base_precision": "fp8"},
    ]
    assert [s.batch_factor for s in steps] == [1, 2, 2, 3, 1]
    assert retry_policy(config_of(tmp_path)) == []  # train.oom_retry off
    compiled = config_of(tmp_path, **{"train.oom_retry": True, "train.compile": True,
                                      "train.batch_size": 1})
    assert [s.change for s in retry_policy(compiled)] == ["gradient checkpointing on"]


def test_several_processes_never_retry_and_say_why(tmp_path) -> None:
    config = config_of(tmp_path, **{"train.oom_retry": True})
    attempt = Attempt(config, failed_step=4, done_step=3, resumed=False, world=2, losses=[])
    message = advice(attempt, 3, "OutOfMemoryError: x", tmp_path / "state")
    stop = OutOfMemoryStop(message, attempt, 3, "OutOfMemoryError: x")
    assert not settle(stop, [])
    assert "With 2 processes the run stops (train.oom_retry applies to one process only)" in (
        message)
    assert "newest saved state (no saved state)" in message
    solo = OutOfMemoryStop(message, Attempt(config, 4, 3, False, 1, []), 3, "x")
    assert settle(solo, [])


def test_out_of_memory_is_recognised_and_the_failed_step_freed() -> None:
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. "
                                         "DefaultCPUAllocator: can't allocate memory: you tried"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))

    def step():
        activations = torch.ones(1000)
        held.append(weakref.ref(activations))
        raise torch.OutOfMemoryError("CUDA out of memory.")

    held: list = []
    try:
        step()
    except torch.OutOfMemoryError as exc:
        assert held[0]() is not None  # the traceback keeps the step's tensors
        assert release(exc) == "OutOfMemoryError: CUDA out of memory."
        assert held[0]() is None


def test_the_test_hook_is_inert_unless_set_and_strict_when_set(tmp_path, monkeypatch) -> None:
    config = config_of(tmp_path)
    injected_oom(config, 3)  # unset: nothing
    monkeypatch.setenv(TEST_HOOK, "step=3,while_batch_above=4")
    injected_oom(config, 3)  # batch 4 is not above 4
    monkeypatch.setenv(TEST_HOOK, "step=3,unless=fp8")
    injected_oom(config, 2)
    with pytest.raises(torch.OutOfMemoryError):
        injected_oom(config, 3)
    monkeypatch.setenv(TEST_HOOK, "step=3,unles=fp8")
    with pytest.raises(ValueError, match="unknown"):
        injected_oom(config, 3)
