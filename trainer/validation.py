"""The validation loss: held-out images, scored with fixed noise and fixed
timesteps so that the curve moves only when the adapter does.

The set is `dataset.validation_split` of the checked images (chosen by
train.seed, then left out of training) or the folder `dataset.validation_path`.
It is scored every `train.validate_every_n_steps` steps and at the end (only
at the end when that is 0), as kohya sd-scripts' `--validate_every_n_steps`
does. Each image gets VALIDATION_TIMESTEPS timesteps spread evenly over the
schedule (kohya's validation timesteps; random ones would let a small set's
curve hang on which timesteps happened to be drawn) and noise that is a
function of (seed, image index): never of the step. The loss is the training
objective's pieces (trainer/step_loss.py, trainer/diffusion.py: target,
Min-SNR weights, masks, noise offset) with no gradient and the adapters in
eval mode (no dropout). With several processes the main process alone
scores the set: every process holds the same weights after a step, so one
score is the score; the others wait for it at the next step's gradient sum.

The run's best is kept in validation.json (core/run_layout.py) with the name
of the adapter file saved at that step, when one is.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
from pathlib import Path

import torch

from core.errors import UserError

VALIDATION_TIMESTEPS = 4


def split_items(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(training, validation) items: round(fraction * n) images, at least one,
    drawn by `seed`; both keep the check's order."""
    if not fraction:
        return list(items), []
    count = max(1, round(fraction * len(items)))
    if count >= len(items):
        raise UserError(
            f"dataset.validation_split = {fraction:g} of {len(items)} usable image"
            f"{'s' if len(items) != 1 else ''} leaves nothing to train on: lower it, add "
            "images, or put validation images in their own folder (dataset.validation_path).")
    chosen = set(random.Random(f"validation-{seed}").sample(range(len(items)), count))
    return ([item for i, item in enumerate(items) if i not in chosen],
            [item for i, item in enumerate(items) if i in chosen])


def held_out(config, report):
    """(report of the images to train on, validation items): the report's
    items lose the split's images; a validation folder is checked like the dataset."""
    d = config.dataset
    if d.validation_path:
        return report, _checked_folder(config, Path(d.validation_path))
    train, validation = split_items(report.items, d.validation_split, config.train.seed)
    trained = copy.copy(report)  # a shallow copy keeps what else the check attached
    trained.items = train
    return trained, validation


def _checked_folder(config, folder: Path) -> list:
    from datasets_tools.check import check_dataset
    from trainer import train_setup as setup

    report = check_dataset(folder, setup.bucket_config(config),
                           caption_extension=config.dataset.caption_extension,
                           masked_loss=config.dataset.masked_loss)
    if not report.trainable:
        raise UserError(
            f'dataset.validation_path = "{folder}" cannot be used for validation: fix the '
            'folder (images with captions, as in dataset.path) or set dataset.validation_path '
            '= "".\n' + report.format_text())
    return report.items


def due(config, has_set: bool, step: int, finished: bool) -> bool:
    """The same answer on every process (they read their losses together)."""
    every = config.train.validate_every_n_steps
    return has_set and (finished or bool(every) and step % every == 0)


def planned_steps(config, has_set: bool, total: int) -> list[int]:
    return [s for s in range(1, total + 1) if due(config, has_set, s, s == total)]


def fixed_timesteps(num_train_timesteps: int, count: int = VALIDATION_TIMESTEPS) -> torch.Tensor:
    """Midpoints of `count` equal parts of the schedule (125, 375, 625, 875 of 1000)."""
    return torch.tensor([(2 * k + 1) * num_train_timesteps // (2 * count) for k in range(count)])


def image_generator(seed: int, index: int) -> torch.Generator:
    """The noise of validation image `index`: the same at every evaluation."""
    return torch.Generator().manual_seed((seed * 1_000_033 + index) * 7_919 % 2**63 + 1)


class Validator:
    """The validation images as the training data pipeline loads them (latents
    cached as dataset.cache_latents says), without flips or caption randomness."""

    def __init__(self, config, items: list, sd, is_main: bool = True):
        from datasets_tools.sampler import Batch
        from datasets_tools.training_data import TrainingData
        from trainer import train_setup as setup

        options = setup.data_options(config, 1)
        captions = dataclasses.replace(options.captions, shuffle_tags=False,
                                       caption_dropout=0.0, tag_dropout=0.0)
        mask_dir = None if config.dataset.validation_path else options.mask_dir
        options = dataclasses.replace(options, flip=False, captions=captions, mask_dir=mask_dir)
        self.data = TrainingData(items, options, setup.latent_cache(config, sd, is_main))
        if self.data.latent_cache is not None:
            self.data.cache_latents()
        self.batches = [Batch(0, i, self.data.buckets[i], (i,), (False,))
                        for i in range(len(items))]
        self.seed = config.train.seed

    @torch.no_grad()
    def loss(self, config, sd, network, ctx) -> float:
        """The mean over images and fixed timesteps; train/eval modes restored."""
        modules = (network, sd.unet, sd.text_encoder)
        modes = [m.training for m in modules]
        for module in modules:
            module.eval()
        try:
            losses = [self._image_loss(config, sd, index, batch, ctx)
                      for index, batch in enumerate(self.batches)]
        finally:
            for module, mode in zip(modules, modes, strict=True):
                module.train(mode)
        return float(torch.stack(losses).mean())

    def _image_loss(self, config, sd, index, batch, ctx) -> torch.Tensor:
        from trainer import diffusion
        from trainer.step_loss import caption_embeddings, latents_of

        tb = self.data.load(batch)
        scheduler, device = sd.noise_scheduler, ctx.device
        timesteps = fixed_timesteps(scheduler.config.num_train_timesteps).to(device)
        count = len(timesteps)
        latents = latents_of(sd, tb)
        noise = diffusion.make_noise((count, *latents.shape[1:]), image_generator(self.seed, index),
                                     config.train.noise_offset).to(device)
        latents = latents.to(device).expand(count, -1, -1, -1)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = diffusion.compute_target(scheduler, latents, noise, timesteps)
        with ctx.autocast():
            text = caption_embeddings(config, sd, tb.captions, False, ctx)
            text = text.to(sd.unet.dtype).expand(count, -1, -1)
            prediction = sd.unet(noisy.to(sd.unet.dtype), timesteps, text).sample
        mask = None if tb.masks is None else tb.masks.to(device).expand(count, -1, -1, -1)
        per_sample = diffusion.per_sample_mse(prediction, target, mask)
        weights = diffusion.loss_weights(scheduler, timesteps, config.train.min_snr_gamma)
        return (per_sample * weights.to(device)).mean().float().cpu()


@dataclasses.dataclass
class BestRecord:
    """validation.json: every evaluation so far, and the best with its file."""

    path: Path
    history: list[tuple[int, float]] = dataclasses.field(default_factory=list)

    @classmethod
    def resumed(cls, path: Path, step: int) -> BestRecord:
        """A resumed run keeps the evaluations up to the step it continues from."""
        try:
            kept = json.loads(path.read_text())["history"] if step else []
        except (OSError, ValueError, KeyError, TypeError):
            kept = []
        return cls(path, [(int(s), float(v)) for s, v in kept if int(s) <= step])

    def add(self, step: int, loss: float, outputs, total_steps: int) -> dict:
        from core.atomic import atomic_write_text
        from trainer.state import SAVE_ADVICE

        self.history.append((step, loss))
        best_step, best_loss = min(self.history, key=lambda entry: (entry[1], entry[0]))
        record = {"best_step": best_step, "best_val_loss": best_loss,
                  "best_file": adapter_file(outputs, best_step, total_steps),
                  "history": [list(entry) for entry in self.history]}
        atomic_write_text(self.path, json.dumps(record, indent=1) + "\n", SAVE_ADVICE)
        return record


def adapter_file(outputs, step: int, total_steps: int) -> str | None:
    """The adapter saved at `step`: the final file (written right after the
    last evaluation), a periodic one still on disk, else None."""
    if step == total_steps:
        return outputs.final_file.name
    periodic = outputs.periodic_file(step)
    return periodic.name if periodic.exists() else None


class RunValidation:
    """What the training loop holds: the scorer and the record (main process)."""

    def __init__(self, config, items: list, sd, outputs, start_step: int):
        self.validator = Validator(config, items, sd)
        self.record = BestRecord.resumed(outputs.layout.validation, start_step)
        self.outputs = outputs

    def evaluate(self, config, sd, network, ctx, step: int, total_steps: int) -> float:
        loss = self.validator.loss(config, sd, network, ctx)
        self.outputs.log(step, val_loss=loss)
        self.record.add(step, loss, self.outputs, total_steps)
        return loss
