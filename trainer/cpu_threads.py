"""How many threads torch computes with, chosen once at the start of a run.

The rule, from `bench/e2e_small.py --thread-sweep` on a 2-core VM shared
with other test runs (BENCHMARKS.md "Whole small job"; 50-step LoRA on the
demo model, 64 px, batch 1, latents encoded every step):

| OMP threads | other load | whole job | step median | slowest step |
|---|---|---|---|---|
| 1 | load avg 1.3 | 11.9 s | 0.106 s | 0.15 s |
| 2 | load avg 1.3-2.9 | 57.9 s | 0.134 s | 15.1 s |
| 1 | + 2 busy loops | 33.0 s | 0.376 s | 0.43 s |
| 2 | + 2 busy loops | 265.9 s | 0.563 s | 34.0 s |

A second thread did not make the demo-sized steps faster here even with a
core mostly free, and as soon as anything else wants a core, the OpenMP threads
wait for each other at every parallel region: one thread the kernel
preempts holds up the whole step (stalls of 5-34 s against a 0.1-0.6 s
median). One thread has nothing to wait for.

So the trainer leaves one core to everything else on the machine (the GUI,
the data pipeline, other jobs) and never runs more threads than the cores
it may use. Beyond 2 cores this is reasoning, not a measurement here: a
pool one core short of the machine still has a free core to absorb one
other busy process.

What the user set wins: OMP_NUM_THREADS / MKL_NUM_THREADS (torch read them
at import; `accelerate launch` and `torchrun` set OMP_NUM_THREADS=1), or a
`torch.set_num_threads` call made before the run (one that sets torch's
own default count cannot be told from the default: use OMP_NUM_THREADS).
"""

from __future__ import annotations

import os

import torch

from core.cpu_cores import threads_for, threads_set_by_user, usable_cores

ADVICE = "set OMP_NUM_THREADS to change"

# The count this module last applied: a later run in the same process (tests,
# a notebook) then sees its own choice, not the user's, and chooses again.
_applied: int | None = None


def _torch_defaults() -> set[int]:
    # torch starts with either the logical or the physical core count
    # (MKL builds size OpenMP's pool to the physical cores).
    counts = {os.cpu_count() or 1, usable_cores()}
    try:
        import psutil

        counts.add(psutil.cpu_count(logical=False) or 1)
    except ImportError:
        pass
    return counts


def _user_setting() -> str | None:
    """Why the current count is the user's, or None if it is torch's default."""
    setting = threads_set_by_user()
    if setting:
        return f"from {setting}"
    current = torch.get_num_threads()
    if current != _applied and current not in _torch_defaults():
        return "set before the run (torch.set_num_threads)"
    return None


def choose_cpu_threads(device, processes: int = 1) -> str:
    """Apply the thread count for a run on `device`; returns the line to log."""
    global _applied
    device = torch.device(device)
    cores = usable_cores()
    if device.type != "cpu":
        # The accelerator computes; the CPU threads only decode and transform
        # the images between steps, which torch's default pool does without
        # holding anything up, so it is left as torch set it.
        return (f"CPU threads: {torch.get_num_threads()} (of {cores} cores, torch's default: "
                f"the model runs on {device.type}; {ADVICE})")
    reason = _user_setting()
    if reason is not None:
        return f"CPU threads: {torch.get_num_threads()} (of {cores} cores, {reason})"
    threads = threads_for(cores, processes)
    # Inter-op threads are left alone: eager training does not use them, and
    # torch allows setting them only once per process, before any parallel
    # work (a second run in the same process would raise).
    torch.set_num_threads(threads)
    _applied = threads
    return f"CPU threads: {threads} (of {cores} cores; {ADVICE})"
