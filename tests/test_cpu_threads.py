"""The CPU thread count of a run: the user's setting wins, otherwise one core
is left free, and the log line says which it was."""

from __future__ import annotations

import pytest
import torch

from core.cpu_cores import ENV_VARS
from trainer import cpu_threads


@pytest.fixture(autouse=True)
def restore_threads(monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.setattr(cpu_threads, "_applied", None)
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    yield
    torch.set_num_threads(threads)


def machine(monkeypatch, cores: int) -> None:
    """A machine with `cores` cores where torch starts with one thread per core."""
    monkeypatch.setattr(cpu_threads, "usable_cores", lambda: cores)
    monkeypatch.setattr(cpu_threads, "_torch_defaults", lambda: {cores})
    torch.set_num_threads(cores)


@pytest.mark.parametrize(("cores", "expected"), [(1, 1), (2, 1), (4, 3), (8, 7)])
def test_one_core_is_left_free_and_the_line_says_so(monkeypatch, cores, expected):
    machine(monkeypatch, cores)
    line = cpu_threads.choose_cpu_threads(torch.device("cpu"))
    assert torch.get_num_threads() == expected
    assert line == f"CPU threads: {expected} (of {cores} cores; set OMP_NUM_THREADS to change)"


@pytest.mark.parametrize("variable", ENV_VARS)
def test_the_environment_variable_wins(monkeypatch, variable):
    machine(monkeypatch, 4)  # the rule would pick 3
    monkeypatch.setenv(variable, "4")
    line = cpu_threads.choose_cpu_threads("cpu")
    assert torch.get_num_threads() == 4
    assert line == f"CPU threads: 4 (of 4 cores, from {variable}=4)"


def test_a_count_set_before_the_run_is_kept(monkeypatch):
    machine(monkeypatch, 8)
    torch.set_num_threads(2)
    line = cpu_threads.choose_cpu_threads("cpu")
    assert torch.get_num_threads() == 2
    assert line.startswith("CPU threads: 2 (of 8 cores, set before the run")


def test_a_second_run_in_the_process_chooses_again(monkeypatch):
    machine(monkeypatch, 4)
    cpu_threads.choose_cpu_threads("cpu")
    assert torch.get_num_threads() == 3
    # Its own earlier choice is not mistaken for the user's: the rule applies again.
    monkeypatch.setattr(cpu_threads, "usable_cores", lambda: 3)
    line = cpu_threads.choose_cpu_threads("cpu")
    assert torch.get_num_threads() == 2
    assert line == "CPU threads: 2 (of 3 cores; set OMP_NUM_THREADS to change)"


def test_data_parallel_processes_share_the_cores(monkeypatch):
    machine(monkeypatch, 9)
    cpu_threads.choose_cpu_threads("cpu", processes=2)
    assert torch.get_num_threads() == 4
    assert cpu_threads.threads_for(2, processes=4) == 1


def test_on_a_gpu_torch_keeps_its_default(monkeypatch):
    machine(monkeypatch, 4)
    line = cpu_threads.choose_cpu_threads(torch.device("cuda", 0))
    assert torch.get_num_threads() == 4
    assert line.startswith("CPU threads: 4 (of 4 cores, torch's default")
    assert "cuda" in line
