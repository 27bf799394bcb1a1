"""How many CPU threads this project computes with: the one rule, torch-free.

Why one core is left free is measured in `trainer/cpu_threads.py`'s
docstring (OpenMP threads that wait for a preempted one stall whole steps on
a shared machine); the LoRA tools' SVDs showed the same (BENCHMARKS.md
"Resizing an adapter": 214 s with 2 threads, 11 s with 1, on a busy 2-core
VM). The trainer and the tools each apply it with `torch.set_num_threads`.
"""

from __future__ import annotations

import os

ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def usable_cores() -> int:
    """The cores this process may run on (a cpuset or `taskset` limits them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_for(cores: int, processes: int = 1) -> int:
    """One core left free, the rest shared by the data-parallel processes."""
    return max(1, (cores - 1) // max(1, processes))


def threads_set_by_user() -> str | None:
    """`NAME=value` when OMP_NUM_THREADS / MKL_NUM_THREADS is set (it wins)."""
    for name in ENV_VARS:
        if os.environ.get(name, "").strip():
            return f"{name}={os.environ[name].strip()}"
    return None
