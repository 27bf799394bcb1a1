"""What every LoRA tool shares: its progress lines and the header it carries over."""

from __future__ import annotations

import io
import json

import torch

from core.tool_progress import fraction, last_progress, report
from networks.kohya_file import read_network_file, save_network_file
from networks.tool_metadata import TOOLS_KEY, carried_metadata


def test_the_gui_reads_the_last_progress_line_among_other_output():
    stream = io.StringIO()
    report(1, 4, "lora_unet_a", stream)
    stream.write("a warning from a library\n")
    report(3, 4, "lora_unet_c", stream)
    assert last_progress(stream.getvalue()) == (3, 4, "lora_unet_c")
    assert fraction(stream.getvalue()) == 0.75
    assert last_progress("error: nothing done\n") is None


def test_carried_header_keeps_the_source_updates_facts_and_recomputes_hashes(tmp_path):
    source = {"ss_network_dim": "128", "modelspec.title": "hero", "ss_output_name": "hero",
              "sshs_model_hash": "stale", "sshs_legacy_hash": "stale"}
    meta = carried_metadata(source, {"ss_network_dim": "32", "ss_output_name": None},
                            tool="resize", detail="rank 32")
    assert meta["ss_network_dim"] == "32" and meta["modelspec.title"] == "hero"
    assert "ss_output_name" not in meta and "sshs_model_hash" not in meta
    again = carried_metadata(meta, {}, tool="merge")
    assert [step["tool"] for step in json.loads(again[TOOLS_KEY])] == ["resize", "merge"]

    path = tmp_path / "out.safetensors"
    save_network_file(path, {"lora_unet_x.alpha": torch.tensor(1.0)}, meta, "fp32")
    _, written = read_network_file(path)
    assert written["sshs_model_hash"] not in ("stale", "")
    assert len(written["sshs_legacy_hash"]) == 8
