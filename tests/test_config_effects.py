"""Every config field has an effect: changed alone from the cpu-demo preset,
it changes what the run does, or the run refuses it.

The fields come from the schema itself, so a field added later is checked
without anyone listing it. "What the run does" is `trainer.run_plan`, built
by the trainer's own start-up steps and first-step loss; a field whose effect
only shows after optimizer steps (clipping, saving, previews, EMA, dropout on
a freshly initialised adapter) is then checked by a real 3-step run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from itertools import count
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal, get_args, get_origin

import pytest
import torch

from core.errors import UserError
from trainer.config import PRESETS_DIR, SECTIONS, TrainConfig, load_config
from trainer.run_plan import resolve_run

PRESET = PRESETS_DIR / "cpu-demo.toml"
# The real run a field falls back to: 3 steps, saving and sampling during
# them, plain SGD (AdamW's first step hardly depends on the gradient's size).
LOOP = {"train.steps": 3, "train.batch_size": 1, "dataset.cache_latents": "off",
        "sample.every_n_steps": 2, "sample.steps": 1, "output.save_every_n_steps": 1,
        "train.optimizer": "sgd"}


def algorithm_option_contexts() -> dict[str, dict[str, Any]]:
    """An algorithm's own options apply only to it (others refuse them): each
    is changed from a config of the first algorithm that has it."""
    from networks.algorithms import algorithms_using, all_options

    preset_type = value_in({}, "network.type")
    return {f"network.{name}": {"network.type": algorithms_using(name)[0]}
            for name in all_options() if preset_type not in algorithms_using(name)}


# Fields that matter only together with another setting: the base the field
# is changed from (for both the plan and the run).
def contexts(a: SimpleNamespace) -> dict[str, dict[str, Any]]:
    varied = {"dataset.path": str(a.varied)}  # no "N_" folder, several aspect ratios
    sizes = {**varied, "dataset.resolution": 128, "dataset.min_bucket": 64,
             "dataset.max_bucket": 256, "dataset.bucket_step": 32}
    buckets = {**sizes, "dataset.buckets": True}
    locon = {"network.type": "locon"}  # conv settings need an algorithm on convs
    both = {"network.train_text_encoder": True}
    lcm = {"task": "lcm_distill"}
    return {
        **algorithm_option_contexts(),
        "model.allow_pickle": {"model.path": str(a.ckpt)},  # only pickle files need it
        "model.v_parameterization": {"model.path": str(a.single_file)},  # folders state it
        "dataset.repeats": varied,  # the demo's "4_demoshape" folder has its own count
        "dataset.strict": {"dataset.path": str(a.one_broken)},  # the demo has no broken file
        "dataset.masked_loss": {"dataset.path": str(a.with_alpha)},  # the demo has no alpha
        "dataset.mask_path": {"dataset.path": str(a.with_alpha), "dataset.masked_loss": True},
        "dataset.buckets": sizes,  # the demo's 64 px are below the default bucket sizes
        "dataset.min_bucket": buckets, "dataset.max_bucket": buckets,
        "dataset.bucket_step": buckets, "dataset.no_upscale": buckets,
        "dataset.keep_tokens": {"dataset.shuffle_captions": True},
        "network.conv_rank": locon, "network.conv_alpha": locon,
        "network.dora_on_output": {"network.dora": True},
        "network.train_unet": both,  # turning off the only trained part is refused
        "train.text_encoder_lr": both,
        "train.epochs": {"train.steps": 0, "train.epochs": 1},
        "train.validate_every_n_steps": {"dataset.validation_split": 0.5},  # needs a set
        **{f"lcm.{name}": lcm for name in SECTIONS["lcm"].model_fields},
        # Only reg samples are weighted; at batch 4 the first batch holds some.
        "train.prior_loss_weight": {"dataset.reg_path": str(a.reg), "train.batch_size": 4},
    }


# Values for fields whose generic change (below) is not a usable setting.
def alternatives(a: SimpleNamespace) -> dict[str, list[Any]]:
    return {
        "model.path": [str(a.single_file)],
        "dataset.path": [str(a.varied)],
        "dataset.caption_extension": [".tags"],  # the demo has .txt captions only
        "dataset.min_bucket": [96],
        "dataset.max_bucket": [192],
        "dataset.bucket_step": [16],
        "network.resume_from": [str(a.adapter)],
        "sample.lcm_lora": [str(a.adapter)],
        "sample.preview_decoder": [str(a.taesd)],
        "dataset.mask_path": [str(a.masks)],
        "dataset.reg_path": [str(a.reg)],
        "dataset.validation_path": [str(a.varied)],  # a checked folder of captioned images
        "train.max_grad_norm": [1e-3],  # surely clipping, whatever the gradient's norm
        # Min-SNR weighs down timesteps whose SNR is above gamma: 0.05 is below the
        # SNR of one of the first step's two timesteps (786 and 471), 5.0 of neither.
        "train.min_snr_gamma": [0.05],
        # With a state every step the last two are kept; every 3rd step keeps only the final one.
        "train.save_state_every_n_steps": [3],
    }


def field_keys() -> list[str]:
    top = [name for name in TrainConfig.model_fields if name not in SECTIONS]
    return top + [f"{s}.{n}" for s, model in SECTIONS.items() for n in model.model_fields]


def annotation(key: str):
    section, _, name = key.rpartition(".")
    fields = SECTIONS[section].model_fields if section else TrainConfig.model_fields
    return fields[name].annotation


def generic_changes(value: Any, kind) -> list[Any]:
    """Candidate new values, in order of preference; the first valid one is used
    (all of them for a choice, each choice being its own code path)."""
    if get_origin(kind) is Literal:
        return [choice for choice in get_args(kind) if choice != value]
    if kind is bool:
        return [not value]
    if kind is int:
        return [value + 1, value + 8, value + 64, value * 2, value - 1]
    if kind is float:
        return [value * 2 if value else 0.5, value / 2, value + 1]
    if kind is str:
        return [f"{value}x" if value else "x"]
    if get_origin(kind) is list:
        return [[*value, "a photo of a dog"]]
    raise AssertionError(f"no generic change for a {kind}: add one here or in alternatives()")


def value_in(overrides: dict[str, Any], key: str) -> Any:
    config = load_config(PRESET, as_set(overrides))
    section, _, name = key.rpartition(".")
    return getattr(getattr(config, section) if section else config, name)


def as_set(overrides: dict[str, Any]) -> list[str]:
    return [f"{key}={json.dumps(value)}" for key, value in overrides.items()]


def plan_of(overrides: dict[str, Any]) -> dict:
    try:
        return resolve_run(load_config(PRESET, as_set(overrides)))
    except UserError as exc:
        return {"refused": str(exc)}


@pytest.fixture(scope="module")
def shared_tokenizer():
    """Each plan loads the model from its files, as a run does; the tokenizer,
    read from the same files every time and never changed, is parsed once:
    its vocabulary is most of a plan's time."""
    from transformers import CLIPTokenizer

    loaded: dict[str, Any] = {}
    original = CLIPTokenizer.from_pretrained

    def from_pretrained(*args, **kwargs):
        key = repr((args, sorted(kwargs.items())))
        if key not in loaded:
            loaded[key] = original(*args, **kwargs)
        return loaded[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CLIPTokenizer, "from_pretrained", from_pretrained)
        yield


@pytest.fixture(scope="module")
def assets(tmp_path_factory, one_torch_thread, shared_tokenizer) -> SimpleNamespace:
    from safetensors.torch import load_file

    from tests.datasets_helpers import noise_image, save_image
    from trainer.demo_assets import ensure_demo_model

    root = tmp_path_factory.mktemp("effects")
    varied = root / "varied"
    for name, size, caption in [("wide", (240, 48), "shape, wide, red"),
                                ("tall", (64, 160), "shape, tall, blue"),
                                ("small", (40, 40), "shape, small, green"),
                                ("square", (96, 96), "shape, square, grey")]:
        save_image(varied / f"{name}.png", size, seed=len(name), caption=caption)
    one_broken = root / "one-broken"  # trains without its broken file, unless strict
    shutil.copytree(varied, one_broken)
    (one_broken / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\ncut short")
    with_alpha, masks = root / "with-alpha", root / "masks"  # masked loss: the demo has no mask
    masks.mkdir()
    for seed in range(2):
        save_image(with_alpha / f"{seed}.png", seed=seed, caption="shape, noise")
        noise_image((64, 64), seed=seed, mode="RGBA").save(with_alpha / f"{seed}.png")
        noise_image((64, 64), seed=seed + 10, mode="L").save(masks / f"{seed}.png")
    single_file = ensure_demo_model().parent / "demo-sd15.safetensors"
    ckpt = root / "demo-sd15.ckpt"
    torch.save({"state_dict": load_file(str(single_file))}, ckpt)
    from diffusers import AutoencoderTiny

    taesd = root / "taesd"
    AutoencoderTiny().save_pretrained(taesd)
    reg = root / "reg"  # regularization images: a kohya "N_class" folder
    for seed in range(3):
        save_image(reg / "2_shape" / f"{seed}.png", seed=seed + 20, caption="shape")
    return SimpleNamespace(varied=varied, one_broken=one_broken, single_file=single_file,
                           ckpt=ckpt, taesd=taesd, with_alpha=with_alpha, masks=masks,
                           reg=reg,
                           adapter=_trained_looking_adapter(root / "adapter.safetensors"))


def _trained_looking_adapter(path: Path) -> Path:
    """An adapter file of the demo's shape whose weights are not a fresh init."""
    from trainer import train_setup as setup
    from trainer.state import Progress
    from trainer.train import export

    config = load_config(PRESET)
    sd = setup.load_model(config, torch.device("cpu"))
    network = setup.build_network(config, sd)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in network.parameters():
            param.add_(0.01 * torch.randn(param.shape, generator=generator))
    export(config, network, None, path, setup.check_dataset_or_refuse(config),
           Progress(step=1, epoch=0, batch=0))
    network.detach()
    return path


class Outcomes:
    """Plans and runs, each base computed once."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._plans: dict[str, dict] = {}
        self._runs: dict[str, dict] = {}
        self._ids = count()

    def plan(self, overrides: dict[str, Any]) -> dict:
        key = json.dumps(overrides, sort_keys=True)
        if key not in self._plans:
            self._plans[key] = plan_of(overrides)
        return self._plans[key]

    def run(self, overrides: dict[str, Any]) -> dict:
        key = json.dumps(overrides, sort_keys=True)
        if key not in self._runs:
            self._runs[key] = self._real_run(overrides)
        return self._runs[key]

    def _real_run(self, overrides: dict[str, Any]) -> dict:
        from safetensors.torch import load_file

        from trainer.train import run

        out = self.folder / f"run-{next(self._ids)}"
        try:
            config = load_config(PRESET, as_set({**overrides, "output.dir": str(out)}))
            result = run(config)
        except UserError as exc:
            return {"refused": str(exc)}
        written = sorted(str(p.relative_to(out)) for p in out.rglob("*")
                         if p.is_file() and "tensorboard" not in p.parts)
        weights = {name: _digest(load_file(str(out / name))) for name in written
                   if name.endswith(".safetensors")}
        metadata = {name: _metadata(out / name) for name in weights}
        return {"files": written, "losses": result.losses, "weights": weights,
                "metadata": metadata}


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(tensors[key].float().numpy().tobytes())
    return digest.hexdigest()


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    from trainer.run_plan import WRITE_TIME_KEYS

    with safe_open(str(path), "pt") as file:
        return {k: v for k, v in (file.metadata() or {}).items() if k not in WRITE_TIME_KEYS}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, assets) -> Outcomes:
    return Outcomes(tmp_path_factory.mktemp("runs"))


def changed_values(key: str, base: dict[str, Any], a: SimpleNamespace) -> list[Any]:
    given = alternatives(a).get(key)
    if given is not None:
        return given
    current = value_in(base, key)
    candidates = generic_changes(current, annotation(key))
    if get_origin(annotation(key)) is Literal:
        return candidates
    for candidate in candidates:
        try:
            value_in({**base, key: candidate}, key)
        except UserError:
            continue
        return [candidate]
    raise AssertionError(f"{key}: no generic change of {current!r} is valid; add one to "
                         "alternatives()")


def differing(first: dict, second: dict) -> list[str]:
    return sorted(k for k in first.keys() | second.keys() if first.get(k) != second.get(k))


def test_the_same_config_resolves_to_the_same_plan_and_run(outcomes: Outcomes) -> None:
    # Otherwise every field would look effective.
    assert plan_of({}) == outcomes.plan({})
    assert "refused" not in outcomes.plan({})
    fresh = Outcomes(outcomes.folder / "again")
    assert fresh.run(LOOP) == outcomes.run(LOOP)
    assert "refused" not in outcomes.run(LOOP)


def test_contexts_and_alternatives_name_existing_fields(assets: SimpleNamespace) -> None:
    keys = set(field_keys())
    named = set(contexts(assets)) | set(alternatives(assets))
    for overrides in contexts(assets).values():
        named |= set(overrides)
    assert named <= keys | set(LOOP), named - keys


def test_contexts_are_valid_runs(assets: SimpleNamespace, outcomes: Outcomes) -> None:
    for key, context in contexts(assets).items():
        if key != "model.allow_pickle":  # refused until the field is set: its point
            assert "refused" not in outcomes.plan(context), (key, outcomes.plan(context))


@pytest.mark.parametrize("key", field_keys())
def test_changing_the_field_alone_changes_the_run(
    key: str, assets: SimpleNamespace, outcomes: Outcomes
) -> None:
    base = contexts(assets).get(key, {})
    for value in changed_values(key, base, assets):
        if differing(outcomes.plan(base), outcomes.plan({**base, key: value})):
            continue
        # Not in the plan: changed from a real run's settings instead.
        loop = {**LOOP, **base}
        for run_value in changed_values(key, loop, assets):
            assert differing(outcomes.run(loop), outcomes.run({**loop, key: run_value})), (
                f"{key} = {value!r} (from {value_in(base, key)!r}, with {base or 'the preset'}) "
                "changes nothing the run does: not the dataset plan, model, network, optimizer, "
                "schedule, previews, file names, export or first-step loss; nor does "
                f"{key} = {run_value!r} change the files, losses or weights of a 3-step run "
                f"with {loop}")



def test_v_parameterization_on_a_diffusers_folder_is_refused_naming_the_setting(
    outcomes: Outcomes,
) -> None:
    # The folder's scheduler config decides; the setting would only mislabel the file.
    refused = outcomes.plan({"model.v_parameterization": True})["refused"]
    assert refused.startswith("model.v_parameterization = true, but ")
    assert 'says prediction_type = "epsilon"' in refused
    assert "set model.v_parameterization = false" in refused
