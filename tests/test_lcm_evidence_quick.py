"""Smoke test of `python -m bench.lcm_evidence --quick` (the benchmark itself
is too slow for the test suite)."""

import math

import torch

from bench.lcm_evidence import main


def test_quick_run_writes_grid_and_finite_mses(tmp_path):
    threads = torch.get_num_threads()
    try:
        report = main(["--quick", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    for key in ("mse_student4_vs_teacher50", "mse_teacher4_vs_teacher50", "ratio",
                "mse_student4_deterministic_vs_teacher50", "ratio_deterministic"):
        assert math.isfinite(report[key]), key
    assert report["lcm_timesteps"] == [999, 759, 499, 259]
    # Our sampling (hooked adapters) and LCMScheduler (merged LoRA) agree.
    assert report["max_abs_ours_hooked_vs_diffusers_merged"] < 1e-3
    grid = tmp_path / "lcm_evidence.png"
    assert grid.is_file() and 0 < grid.stat().st_size < 200_000
    from PIL import Image

    with Image.open(grid) as image:  # rows: teacher 50, teacher 4, student LCM, student determ.
        assert image.height == 4 * (8 + 2) * 4
    assert (tmp_path / "lcm_evidence_quick.json").is_file()
