"""The steps before the first training step, each a short function:
paths, dataset check, model, network, data pipeline."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import torch

from core.errors import UserError
from core.paths import cache_root
from trainer.demo_assets import builtin_dataset, builtin_model

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def model_path(config) -> Path:
    return builtin_model(config.model.path) or Path(config.model.path)


def dataset_path(config) -> Path:
    return builtin_dataset(config.dataset.path) or Path(config.dataset.path)


def bucket_config(config):
    from datasets_tools.buckets import BucketConfig

    d = config.dataset
    return BucketConfig(
        resolution=d.resolution, enabled=d.buckets, step=d.bucket_step,
        min_side=d.min_bucket, max_side=d.max_bucket, no_upscale=d.no_upscale,
    )  # fmt: skip


def check_dataset_or_refuse(config):
    """The same check as `python -m datasets_tools check`; refuses with its
    report. The files it skips are printed (the run's log), before any step."""
    from datasets_tools.check import check_dataset

    folder = dataset_path(config)
    report = check_dataset(
        folder,
        bucket_config(config),
        caption_extension=config.dataset.caption_extension,
        repeats=config.dataset.repeats,
        strict=config.dataset.strict,
        **mask_options(config),
    )
    if config.dataset.strict and report.skipped and not report.errors:
        n = len(report.skipped)
        raise UserError(
            f"dataset.strict = true refuses {folder}: {n} file{'s' if n != 1 else ''} cannot be "
            "used (listed below). Fix or remove them, or set dataset.strict = false to train "
            "without them.\n" + report.skipped_text())
    report.raise_if_untrainable()
    # One list per run, not one per process: RANK is set by torchrun / accelerate.
    if report.skipped and os.environ.get("RANK", "0") == "0":
        print(f"dataset: {report.skipped_text()}", file=sys.stderr, flush=True)
    report.reg = check_reg_or_refuse(config)
    return report


def check_reg_or_refuse(config):
    """dataset.reg_path checked like the training set (its own `N_class` repeats;
    1 for images outside such folders; a reg image's mask is its alpha channel);
    None without one. A folder with no usable image is refused, naming the setting."""
    from datasets_tools.check import check_dataset

    d = config.dataset
    if not d.reg_path:
        return None
    if config.task == "lcm_distill":
        # The distillation loss has no per-image target to regularize towards.
        raise UserError(
            f'dataset.reg_path = "{d.reg_path}" does not apply to task = "lcm_distill" (its '
            "consistency loss compares the adapter with the base model, not with images); "
            'remove dataset.reg_path, or set task = "train".')
    report = check_dataset(Path(d.reg_path), bucket_config(config),
                           caption_extension=d.caption_extension, strict=d.strict,
                           masked_loss=d.masked_loss)
    if not report.trainable:
        raise UserError(
            f'dataset.reg_path = "{d.reg_path}" cannot be used for regularization images: '
            "fix the folder (report below), or remove dataset.reg_path to train without "
            "them.\n" + report.format_text())
    if report.skipped and os.environ.get("RANK", "0") == "0":
        print(f"dataset.reg_path: {report.skipped_text()}", file=sys.stderr, flush=True)
    return report


def reg_items(report) -> list:
    """The reg folder's usable images ([] without dataset.reg_path)."""
    return report.reg.items if report.reg is not None else []


def split_validation(config, report):
    """(report of the images to train on, validation items: trainer/validation.py)."""
    from trainer.validation import held_out

    return held_out(config, report)


def check_device(mixed_precision: str, device: torch.device) -> None:
    if mixed_precision == "fp16" and device.type == "cpu":
        raise UserError(
            'train.mixed_precision = "fp16" needs a GPU; on the CPU use "bf16" or "no".'
        )


def load_model(config, device: torch.device):
    from trainer.base_precision import check_base_precision, store_frozen_model
    from trainer.model_loading import load_sd_model

    check_base_precision(config, device)
    sd = load_sd_model(
        model_path(config), allow_pickle=config.model.allow_pickle,
        v_parameterization=config.model.v_parameterization,
    )  # fmt: skip
    # The frozen weights only (model.base_precision; trainer/base_precision.py):
    # adapters stay fp32, and the VAE too (latents are encoded once, and an
    # fp16 SD VAE overflows to NaN). Cast before the move: an fp32 U-Net on the
    # GPU first made loading, not training, the run's VRAM peak (4.3 GB for SD1.5).
    store_frozen_model(sd, config.model.base_precision,
                       WEIGHT_DTYPES[config.train.mixed_precision], device)
    if config.model.v_parameterization and sd.prediction_type != "v_prediction":
        # A diffusers folder states its prediction type; training it as
        # v-prediction anyway would write v-prediction metadata for an
        # epsilon model.
        raise UserError(
            f"model.v_parameterization = true, but {sd.source} is a diffusers folder whose "
            f'scheduler config says prediction_type = "{sd.prediction_type}", which decides: '
            "set model.v_parameterization = false, or use a single-file v-prediction checkpoint."
        )
    for part in (sd.unet, sd.text_encoder, sd.vae):
        part.requires_grad_(False).to(device)
    if config.train.attention == "xformers":
        try:
            sd.unet.enable_xformers_memory_efficient_attention()
        except (ImportError, ModuleNotFoundError, ValueError) as exc:
            raise UserError(
                f'train.attention = "xformers" but xformers cannot be used here ({exc}); '
                'use "sdpa" (PyTorch\'s built-in attention).'
            ) from exc
    if config.train.gradient_checkpointing:
        sd.unet.enable_gradient_checkpointing()
        if config.network.train_text_encoder:
            sd.text_encoder.gradient_checkpointing_enable()
    return sd


DORA_OUTPUT_AXIS_WARNING = (
    "warning: network.dora_on_output = true stores the DoRA magnitude per output channel "
    "(LyCORIS wd_on_output). A1111 applies such files wrongly and ComfyUI has an open bug "
    "for them; only lycoris loads them as trained. Leave it false for files that load the "
    "same everywhere."
)


def build_network(config, sd):
    """A fresh network, or the one in `network.resume_from` to continue training
    it: the file decides the algorithm, ranks and options, and a [network]
    setting given in the config that says otherwise is refused."""
    from networks.export import load_network
    from networks.network import AdapterNetwork

    spec = config.network.to_spec()
    if config.network.resume_from:
        network = load_network(config.network.resume_from, sd.unet, sd.text_encoder, spec.dropout)
        refuse_contradictions(config.network, network.spec)
    else:
        network = AdapterNetwork.create(spec, sd.unet, sd.text_encoder)
    if network.spec.dora_on_output:
        print(DORA_OUTPUT_AXIS_WARNING, file=sys.stderr)
    network.to(torch.float32)  # adapter weights stay fp32 under mixed precision
    return network.attach()


def refuse_contradictions(section, file_spec) -> None:
    """UserError naming the first [network] key set in the config whose value
    differs from what the `resume_from` file holds."""
    values = {"type": file_spec.algorithm, "rank": file_spec.rank, "alpha": file_spec.alpha,
              "train_unet": file_spec.train_unet,
              "train_text_encoder": file_spec.train_text_encoder,
              **file_spec.option_values()}
    if file_spec.targets_conv:
        values |= {"conv_rank": file_spec.conv_rank, "conv_alpha": file_spec.conv_alpha}
    for key in sorted(section.model_fields_set & set(values)):
        mine, theirs = getattr(section, key), values[key]
        if mine != theirs:
            raise UserError(
                f"network.{key} = {_toml(mine)} contradicts network.resume_from = "
                f'"{section.resume_from}", which holds {key} = {_toml(theirs)}. Training '
                f"continues the file as it is: remove network.{key} from the config, or set it "
                f"to {_toml(theirs)}, or start a new adapter without network.resume_from."
            )


def _toml(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"'
    return f"{value:g}" if isinstance(value, float) else str(value)


def caption_options(config):
    from datasets_tools.captions import CaptionOptions

    d = config.dataset
    return CaptionOptions(
        prefix=d.trigger_word, shuffle_tags=d.shuffle_captions, keep_tokens=d.keep_tokens,
        caption_dropout=d.caption_dropout, tag_dropout=d.tag_dropout,
    )  # fmt: skip


def data_options(config, global_batch: int):
    from datasets_tools.training_data import DataOptions

    return DataOptions(
        buckets=bucket_config(config), flip=config.dataset.flip, captions=caption_options(config),
        batch_size=global_batch, seed=config.train.seed, keep_alpha=config.dataset.masked_loss,
        mask_dir=mask_options(config)["mask_dir"],
    )  # fmt: skip


def mask_options(config) -> dict:
    """dataset.masked_loss and dataset.mask_path as the check's keyword arguments."""
    d = config.dataset
    if d.masked_loss and config.task == "lcm_distill":
        # The consistency loss compares the student with itself at another
        # timestep, not with the image: there is no image pixel to weight.
        raise UserError(
            'dataset.masked_loss = true does not apply to task = "lcm_distill" (its '
            "consistency loss is not measured against the image); set "
            'dataset.masked_loss = false, or task = "train".')
    return {"masked_loss": d.masked_loss, "mask_dir": Path(d.mask_path) if d.mask_path else None}


def total_steps(config, items, global_batch: int, reg=()) -> int:
    """train.steps, or train.epochs worth of steps: known from the dataset
    alone, so a finished run is recognised before the model loads."""
    if config.train.steps:
        return config.train.steps
    from datasets_tools.training_data import TrainingData

    batches = len(TrainingData(items, data_options(config, global_batch), reg_items=reg))
    return config.train.epochs * math.ceil(batches / config.train.grad_accum)


def latent_cache(config, sd, is_main: bool):
    """The (empty) LatentCache dataset.cache_latents asks for; None: encode at every step."""
    from datasets_tools.hashing import module_identity
    from datasets_tools.latent_cache import LatentCache

    if config.dataset.cache_latents == "off":
        return None
    folder = cache_root() / "latents" if config.dataset.cache_latents == "disk" else None
    return LatentCache(sd.vae, module_identity(sd.vae), folder, progress=is_main)


def build_training_data(config, items, sd, global_batch: int, is_main: bool, wait_for_everyone,
                        reg=()):
    from datasets_tools.training_data import TrainingData

    options = data_options(config, global_batch)
    cache = latent_cache(config, sd, is_main)
    folder = cache.store.directory if cache is not None else None
    data = TrainingData(items, options, cache, reg_items=reg)  # reg latents cached alike
    if reg and is_main:
        from datasets_tools.regularization import describe

        print(describe(data.reg_plan), flush=True)
    if cache is not None:
        # On disk the main process encodes and the others then read its files.
        if folder is not None and not is_main:
            wait_for_everyone()
        data.cache_latents()
        if folder is not None and is_main:
            wait_for_everyone()
    return data
