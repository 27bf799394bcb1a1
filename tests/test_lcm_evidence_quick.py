"""Smoke test of `python -m bench.lcm_evidence --quick` (the benchmark itself
is too slow for the test suite)."""

import math

import pytest
import torch

from bench.lcm_evidence import FullStudent, main
from bench.lcm_evidence_data import class_embeddings, tiny_unet


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
    # The reference's path starts at the noise, so one jump from its first
    # point is the 1-step sample; the jumps nearer the end are more accurate.
    assert report["mse_jump_from_999_vs_teacher50"] == pytest.approx(
        report["mse_student1_vs_teacher50"], rel=1e-5
    )
    assert report["mse_teacher_jump_from_259_vs_teacher50"] < (
        report["mse_teacher_jump_from_999_vs_teacher50"]
    )
    # Our sampling (hooked adapters) and LCMScheduler (merged LoRA) agree.
    assert report["max_abs_ours_hooked_vs_diffusers_merged"] < 1e-3
    grid = tmp_path / "lcm_evidence.png"
    assert grid.is_file() and 0 < grid.stat().st_size < 200_000
    from PIL import Image

    with Image.open(grid) as image:  # rows: teacher 50, teacher 4, student LCM, student determ.
        assert image.height == 4 * (8 + 2) * 4
    assert (tmp_path / "lcm_evidence_quick.json").is_file()


def test_full_student_swaps_the_teacher_weights_in_and_back():
    torch.manual_seed(0)
    unet = tiny_unet(8)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500, 20])
    cond = class_embeddings(torch.tensor([0, 4]))
    with torch.no_grad():
        teacher = unet(x, t, cond).sample
        student = FullStudent(unet)
        for param in unet.parameters():  # as if distillation had trained it
            param.add_(0.01 * torch.randn_like(param))
        trained = unet(x, t, cond).sample
        assert not torch.allclose(trained, teacher, atol=1e-4)
        student.set_enabled(False)
        assert torch.equal(unet(x, t, cond).sample, teacher)
        student.set_enabled(True)
        assert torch.equal(unet(x, t, cond).sample, trained)
