"""What a run of a config would do, worked out in seconds without training.

`resolve_run` takes the trainer's own start-up steps in the trainer's order
(`trainer.train._run`: dataset check, step count, model, seed, network, data,
optimizer and schedule) and adds what the run would then produce: the first
batches and the loss of its first step (`trainer.train.training_loss`), the
preview settings, the files' names and an adapter exported the way the run
exports one. Every value comes from those functions, never from the config
directly, so a setting that the trainer ignores leaves the plan unchanged
(tests/test_config_effects.py relies on that). Nothing is written to
output.dir: the export goes to a temporary folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import tempfile
import warnings
from pathlib import Path

import torch

# Enough batches to show shuffling, flips and dropout; few enough to stay fast.
PLAN_BATCHES = 4
# A longer schedule is summarised by its values at these many evenly spaced steps.
SCHEDULE_POINTS = 64
# Metadata that says when the file was written, not what the run did.
WRITE_TIME_KEYS = ("ss_training_finished_at", "modelspec.date")


def resolve_run(config, device: torch.device | None = None) -> dict:
    """The run of `config` as plain values; raises the UserError the run would raise."""
    from accelerate.utils import set_seed

    from datasets_tools.training_data import TrainingData
    from trainer import train_setup as setup
    from trainer.optim import build_optimizer, build_scheduler

    device = device or torch.device("cpu")
    global_batch = config.train.batch_size  # one process
    setup.check_device(config.train.mixed_precision, device)
    report = setup.check_dataset_or_refuse(config)
    report, validation_items = setup.split_validation(config, report)
    total = setup.total_steps(config, report.items, global_batch, setup.reg_items(report))
    sd = setup.load_model(config, device)
    set_seed(config.train.seed)
    network = setup.build_network(config, sd)
    try:
        # Pixels, not cached latents: encoding the whole dataset would be most of the time.
        data = TrainingData(report.items, setup.data_options(config, global_batch),
                            reg_items=setup.reg_items(report))
        groups = network.parameter_groups(config.train.unet_lr, config.train.text_encoder_lr)
        optimizer = build_optimizer(config.train.optimizer, groups, config.train.weight_decay)
        scheduler = build_scheduler(
            config.train.scheduler, optimizer, config.train.warmup_steps, total
        )
        return {
            "dataset": _dataset_plan(report, data, setup.latent_cache(config, sd, True), total),
            "model": _model_facts(sd),
            "network": _network_facts(network),
            "optimizer": _optimizer_facts(optimizer),
            "schedule": _learning_rates(scheduler, total),
            "preview": _preview_plan(config),
            "files": _file_names(config),
            "export": _exported(config, network, report, total),
            "first_step": _first_step(config, sd, network, data, device),
            "oom_retry": _oom_fallbacks(config),
            "validation": _validation_plan(config, validation_items, total),
        }
    finally:
        network.detach()


def _dataset_plan(report, data, cache, total: int) -> dict:
    batches = []
    for index, tb in enumerate(data.batches()):
        if index == PLAN_BATCHES:
            break
        batches.append({"bucket": tb.batch.bucket, "items": tb.batch.items,
                        "flips": tb.batch.flips, "captions": tb.captions, "is_reg": tb.is_reg,
                        "pixels": _digest([tb.pixels]),
                        "masks": None if tb.masks is None else _digest([tb.masks])})
    return {
        "items": [(i.rel_path, i.repeats, i.caption, i.width, i.height) for i in report.items],
        "reg_items": [(i.rel_path, i.caption) for i in data.items[len(report.items):]],
        "reg_repeats": data.reg_plan.repeats,
        "samples_per_epoch": data.sampler.samples_per_epoch,
        "batches_per_epoch": len(data),
        "total_steps": total,
        "buckets": sorted(set(data.buckets)),
        "first_batches": batches,
        "latent_cache": None if cache is None else str(cache.store.directory or "memory"),
    }


def _model_facts(sd) -> dict:
    from trainer.base_precision import storage_summary

    return {
        "source": str(sd.source),
        "prediction_type": sd.prediction_type,
        "dtypes": [str(part.dtype) for part in (sd.unet, sd.text_encoder, sd.vae)],
        # As stored (model.base_precision): fp8 codes show as float8_e4m3fn.
        "stored": [storage_summary(part) for part in (sd.unet, sd.text_encoder)],
        "unet_checkpointing": sd.unet.is_gradient_checkpointing,
        "text_encoder_checkpointing": bool(
            getattr(sd.text_encoder, "is_gradient_checkpointing", False)),
        "attention": sorted({type(p).__name__ for p in sd.unet.attn_processors.values()}),
    }


def _network_facts(network) -> dict:
    state = network.state_dict()
    return {
        "unet_modules": len(network.unet_adapters),
        "text_encoder_modules": len(network.text_encoder_adapters),
        "tensors": {key: tuple(value.shape) for key, value in sorted(state.items())},
        "trainable": sum(p.numel() for p in network.parameters() if p.requires_grad),
        "weights": _digest(state[key] for key in sorted(state)),
    }


def _optimizer_facts(optimizer) -> dict:
    hyper = ("lr", "weight_decay", "betas", "momentum", "eps")
    return {
        "type": f"{type(optimizer).__module__}.{type(optimizer).__name__}",
        "groups": [
            {"params": sum(p.numel() for p in group["params"]),
             **{k: group[k] for k in hyper if k in group}}
            for group in optimizer.param_groups
        ],
    }


def _learning_rates(scheduler, total: int) -> list[list[float]]:
    every = max(1, total // SCHEDULE_POINTS)
    rates = []
    with warnings.catch_warnings():
        # Stepping a schedule without optimizer steps is what a plan does.
        warnings.simplefilter("ignore", UserWarning)
        for step in range(total):
            if step % every == 0:
                rates.append(list(scheduler.get_last_lr()))
            scheduler.step()
    return rates


def _preview_plan(config) -> dict:
    from trainer.preview import preview_settings

    return dataclasses.asdict(preview_settings(config))


def _file_names(config) -> dict:
    from trainer.config import output_dir
    from trainer.run_outputs import RunOutputs

    outputs = RunOutputs(output_dir(config), config.output.name, config.output.keep_last_n)
    return {"final": str(outputs.final_file), "periodic": str(outputs.periodic_file(1)),
            "state": str(outputs.state_root), "samples": str(outputs.samples)}


def _exported(config, network, report, total: int) -> dict:
    """The adapter as the run's end would write it, read back from the file."""
    from safetensors import safe_open

    from trainer.state import Progress
    from trainer.train import export

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "plan.safetensors"
        export(config, network, None, path, report, Progress(step=total, epoch=0, batch=0))
        with safe_open(str(path), "pt") as file:
            metadata = {k: v for k, v in (file.metadata() or {}).items()
                        if k not in WRITE_TIME_KEYS}
            dtypes = sorted({str(file.get_slice(k).get_dtype()) for k in file.keys()})
    return {"metadata": metadata, "dtypes": dtypes}


def _first_step(config, sd, network, data, device) -> dict:
    """The loss of step 1's first batch, through the trainer's own loss; the
    latents are encoded from its pixels, as a latent cache would hold them."""
    from trainer.compile import step_unet
    from trainer.step_loss import StepContext, step_generator, training_loss

    tb = next(iter(data.batches()))
    context = StepContext(device, config.train.mixed_precision)
    context.unet = step_unet(config, sd.unet, network, data, log=False)
    network.train()
    sd.unet.train()
    generator = step_generator(config.train.seed, 0, 0)
    mine = slice(0, config.train.batch_size)
    # A compiled step's loss is the eager one (tests/test_compile.py): the
    # plan does not wait minutes for a compile to show it.
    with torch.compiler.set_stance("force_eager"):
        loss = training_loss(config, sd, network, tb, mine, generator,
                             bool(network.text_encoder_adapters), context)
    return {"loss": float(loss.detach()), "step_unet": type(context.step_unet(sd)).__name__}


def _validation_plan(config, items, total: int) -> dict:
    """The held-out images and the steps that score them (trainer/validation.py)."""
    from trainer.validation import planned_steps

    return {"items": [(str(i.path), i.caption) for i in items],
            "steps": planned_steps(config, bool(items), total)}


def _oom_fallbacks(config) -> list[dict]:
    """What the run does on out of memory: the fallbacks trainer/oom_retry.py walks."""
    from trainer.oom_retry import retry_policy

    return [{"change": f.change, "set": f.overrides} for f in retry_policy(config)]


def _digest(tensors) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
