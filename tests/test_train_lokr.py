"""LoKr through the real trainer on the demo model: it trains, the exported
file reads back as the LoKr network that was trained (same outputs as the
training state), merges through `python -m trainer sample`, and
`network.resume_from` refuses another factor naming both values."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from core.errors import UserError
from networks.export import load_network
from networks.lokr import LoKrModule
from networks.network import AdapterNetwork
from tests.sd_fixtures import assert_outputs_close, fixed_inputs, run
from tests.test_train import config_for
from trainer.merge import merge_adapters
from trainer.train import run as train

REPO = Path(__file__).resolve().parents[1]
LOKR = {"network.type": "lokr", "network.factor": 4, "network.conv_rank": 4,
        "network.conv_alpha": 2, "network.rank": 4, "network.alpha": 2}  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(demo_model_dir, tmp_path_factory):
    from trainer.demo_assets import write_demo_dataset

    dataset = tmp_path_factory.mktemp("data") / "all"
    write_demo_dataset(dataset, size=64)
    out = tmp_path_factory.mktemp("lokr-run")
    config = config_for(demo_model_dir, dataset, out, **LOKR, **{
        "train.steps": 4, "train.unet_lr": 3e-3})  # fmt: skip
    result = train(config)
    assert result.final_file.exists() and not result.stopped_early
    return result.final_file, out


def test_a_lokr_network_trains_and_its_file_reads_back(trained, demo_sd):
    path, out = trained
    metadata = json.loads(subprocess.run(
        [sys.executable, "-m", "networks", "inspect", str(path), "--json"], cwd=REPO,
        capture_output=True, text=True, check=True).stdout)  # fmt: skip
    assert set(metadata["algorithms"]) == {"lokr"} and metadata["problems"] == []
    assert metadata["options"] == {"factor": 4} and set(metadata["ranks"]) >= {"4"}
    args = json.loads(metadata["metadata"]["ss_network_args"])
    assert args == {"algo": "lokr", "conv_dim": "4", "conv_alpha": "2", "factor": "4"}

    sd = copy.deepcopy(demo_sd)
    network = load_network(path, sd.unet, sd.text_encoder)
    assert all(isinstance(a, LoKrModule) for a in network.adapters)
    assert network.spec.algorithm == "lokr" and network.spec.options["factor"] == 4
    assert any(a.layout.w2_rank == 4 for a in network.adapters), "some w2 must be low-rank"
    # The file is the training state's adapter, and it changes the model.
    (state,) = (out / "state").iterdir()
    saved = load_file(state / "adapter.safetensors")
    inputs = fixed_inputs(sd)
    base = run(sd.text_encoder, sd.unet, inputs)
    network.attach()
    adapted = run(sd.text_encoder, sd.unet, inputs)
    network.detach()
    again = AdapterNetwork.from_state_dict(saved, sd.unet, sd.text_encoder).attach()
    assert_outputs_close(run(sd.text_encoder, sd.unet, inputs), adapted)
    again.detach()
    assert (adapted.noise - base.noise).abs().max() > 1e-4, "training changed nothing"

    # One merge path: the merged weights compute what the hooks compute.
    merged = copy.deepcopy(demo_sd)
    merge_adapters(merged, [(path, 1.0)])
    assert_outputs_close(run(merged.text_encoder, merged.unet, inputs), adapted)


def test_python_m_trainer_sample_merges_a_lokr_file(trained, demo_model_dir, tmp_path):
    path, _ = trained
    image = tmp_path / "lokr.png"
    command = [sys.executable, "-m", "trainer", "sample", "--model",
               str(demo_model_dir / "diffusers"), "--lora", f"{path}:0.8", "--prompt",
               "a red circle", "--steps", "2", "--size", "64x64", "--out", str(image)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    with Image.open(image) as png:
        assert png.size == (64, 64)


def test_resume_from_refuses_another_factor_naming_both(trained, demo_sd, demo_model_dir):
    from trainer.config import load_config
    from trainer.config_io import require_paths
    from trainer.train_setup import build_network

    path, _ = trained
    # The checks before any model is loaded take a LoKr file as an adapter.
    require_paths(load_config(None, [f"network.resume_from={path}", "dataset.path=demo",
                                     f"model.path={demo_model_dir / 'diffusers'}"]))
    sd = copy.deepcopy(demo_sd)
    config = load_config(None, [f"network.resume_from={path}", "network.type=lokr",
                                "network.factor=8"])
    with pytest.raises(UserError) as raised:
        build_network(config, sd)
    assert str(raised.value).startswith(
        f'network.factor = 8 contradicts network.resume_from = "{path}", which holds '
        "factor = 4.")
    # The same factor, said explicitly, continues the file.
    config = load_config(None, [f"network.resume_from={path}", "network.factor=4",
                                "network.type=lokr"])
    network = build_network(config, sd)
    assert network.spec.options["factor"] == 4
    network.detach()
    torch.testing.assert_close(
        network.state_dict(), {k: v for k, v in load_file(path).items()}, rtol=0, atol=0)
