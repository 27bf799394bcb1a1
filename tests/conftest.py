"""Shared fixtures. Models are generated per session in temporary folders."""

import os

# Before anything imports huggingface_hub, which reads these once: no test
# may reach a model hub, and a network attempt must fail, not hang.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# `make test` runs one pytest worker per core (pytest-xdist): a worker's torch,
# and the trainers it starts, then use one thread each instead of all cores
# each, which would oversubscribe the machine and slow every step down.
if os.environ.get("PYTEST_XDIST_WORKER") and not any(
    os.environ.get(name) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
):
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory):
    """Folder written by `make-demo-model` (seed 0), built once per session.

    Holds `diffusers/` (a StableDiffusionPipeline folder) and
    `demo-sd15.safetensors` (the same weights in the original single-file
    layout). Treat it as read-only: other tests share it.
    """
    from trainer.demo_model import make_demo_model

    out = tmp_path_factory.mktemp("demo-model")
    make_demo_model(out, seed=0)
    return out


@pytest.fixture(scope="session")
def demo_sd(demo_model_dir):
    """`SDModel` loaded from the demo diffusers folder, shared by the session.

    Do not modify it in place (wrap or deep-copy first): other tests see it.
    """
    from trainer.model_loading import load_sd_model

    return load_sd_model(demo_model_dir / "diffusers")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Two OpenMP threads on a 2-core machine shared with other jobs can spin
    against each other and slow a step down 100x; CPU-heavy modules use one."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
