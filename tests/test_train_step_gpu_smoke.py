"""Smoke test of `python -m bench.train_step_gpu --smoke`: the GPU benchmark
runs only when a GPU is lent, so its script is checked here on the demo model."""

import json

import pytest
import torch

from bench.train_step_gpu import CASES, main


@pytest.mark.usefixtures("one_torch_thread")
def test_smoke_run_reports_every_case_with_consistent_numbers(tmp_path):
    report = main(["--smoke", "--workdir", str(tmp_path / "work"), "--out", str(tmp_path)])
    assert report["resolution"] == 64 and report["bf16_matmul_peak_tflops"] > 0
    cases = [(c["task"], c["batch"], c["gradient_checkpointing"], c["compile"])
             for c in report["cases"]]
    assert cases == CASES  # the compiled cases are left out of --smoke
    for case in report["cases"]:
        assert case["it_s"] > 0 and case["first_step_extra_s"] > -1 / case["it_s"]
        assert case["images_s"] == pytest.approx(case["it_s"] * case["batch"])
        assert (case["task"] == "train") == ("mfu" in case)
        assert case.get("mfu", 1) > 0
        assert (case["peak_vram_gb"] is None) == (not torch.cuda.is_available())
    assert json.loads((tmp_path / "train_step_gpu_smoke.json").read_text()) == report
