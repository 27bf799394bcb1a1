"""Smoke test of `python -m bench.adapter_overhead`'s memory part (the timing
part needs the SD1.5-size U-Net and minutes; see BENCHMARKS.md): what one
training step on a 1280x1280 Linear keeps for backward stays below one
full-size matrix for LoHa, LoKr and LoRA+DoRA, while the naive formula keeps
at least one."""

import pytest

from bench.adapter_overhead import MEMORY_CASES, main


@pytest.mark.parametrize("name", sorted(MEMORY_CASES))
def test_no_full_size_tensor_kept_for_backward(name):
    memory = MEMORY_CASES[name][1]()
    assert memory["ours_MiB"] < memory["full_MiB"] / 4
    assert memory["naive_MiB"] >= memory["full_MiB"]


def test_command_line_memory_only(capsys):
    main(["--cases", "", "--memory", "lokr,dora"])
    out = capsys.readouterr().out
    assert "LoKr r16" in out and "LoRA r16 + DoRA" in out
    with pytest.raises(SystemExit):
        main(["--cases", "no such adapter"])
