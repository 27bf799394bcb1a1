"""`run(config)`: the training loop, top to bottom in named steps.

Data parallel across processes (`accelerate launch`, `torchrun`): see
trainer/processes.py. Step losses stay on the device between reads
(trainer/loss_readout.py); `train.compile` compiles the step's U-Net
(trainer/compile.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from trainer.lcm import EmaTarget
from trainer.lcm_state import restore_weights, training_weights
from trainer.loss_readout import READ_EVERY_S, LossReadout, checked, diverged
from trainer.oom import Attempt, injected_oom, is_out_of_memory, rng_states, stop_after_oom
from trainer.processes import stop_requested, sum_across, sync_gradients
from trainer.run_guard import RunGuard, resume_point
from trainer.state import SAVE_ADVICE, Progress, load_latest_state, restore_rng_states, save_state
from trainer.step_loss import (
    StepContext,
    frozen_text_cache,
    step_generator,
    training_loss,
)
from trainer.stop_flag import StopFlag
from trainer.validation import RunValidation
from trainer.validation import due as validation_due


@dataclass
class RunResult:
    steps_done: int
    final_file: object  # Path of the exported adapter, None when stopped early
    losses: list[float]
    stopped_early: bool
    is_main: bool = True  # only the main process reports (and writes files)
    oom_retries: list[dict] = field(default_factory=list)  # trainer/oom_retry.py


def run(config, resume: bool = False, stop_at_step: int | None = None,
        oom_retries: list[dict] | None = None) -> RunResult:
    """Train; the guard holds the output folder (lock, status.json) however
    the run ends, and a signal ends the start-up at once or training at the
    next step boundary (trainer/stop_flag.py). `oom_retries`: this run's
    retries so far after out of memory, for status.json (trainer/oom_retry.py)."""
    threads = torch.get_num_threads()  # the run chooses its own (trainer/cpu_threads.py)
    try:
        with StopFlag() as stop, RunGuard(oom_retries) as guard:
            result = _run(config, resume, stop_at_step, stop, guard)
            guard.ended(result.stopped_early, result.steps_done)
            return result
    finally:
        torch.set_num_threads(threads)


def _run(config, resume: bool, stop_at_step: int | None, stop: StopFlag, guard: RunGuard
         ) -> RunResult:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from trainer import train_setup as setup
    from trainer.config import config_to_toml, output_dir
    from trainer.run_outputs import RunOutputs, check_writable

    # cpu=True is what makes accelerate set up gloo under torchrun without GPUs.
    # Mixed precision is ours (autocast + scaler), not accelerate's: its state is
    # a process-wide singleton that a second run in the same process cannot change.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    is_main, world, rank = (
        accelerator.is_main_process,
        accelerator.num_processes,
        accelerator.process_index,
    )
    from trainer.cpu_threads import choose_cpu_threads

    threads_line = choose_cpu_threads(accelerator.device, processes=world)
    if is_main:
        print(threads_line, flush=True)
    outputs = RunOutputs(output_dir(config), config.output.name, config.output.keep_last_n)

    # 1. Refuse early: another trainer in the folder, unwritable output, a
    # finished run to resume, bad device settings, untrainable dataset.
    if is_main:
        check_writable(outputs.folder)
        guard.take(outputs)
    if resume and config.train.steps:  # train.epochs needs the dataset for the total
        resume_point(outputs.state_root, config.train.steps)
    setup.check_device(config.train.mixed_precision, accelerator.device)
    report = setup.check_dataset_or_refuse(config)
    report, validation_items = setup.split_validation(config, report)
    global_batch = config.train.batch_size * world
    total_steps = setup.total_steps(config, report.items, global_batch, setup.reg_items(report))
    start_step = resume_point(outputs.state_root, total_steps, config.train.epochs) if resume else 0
    guard.starting(start_step, total_steps)

    # 2. Model, network, data. The seed makes the adapter's initial weights
    # the same in every process and every run.
    sd = setup.load_model(config, accelerator.device)
    step_context = StepContext(accelerator.device, config.train.mixed_precision)
    set_seed(config.train.seed)
    network = setup.build_network(config, sd)
    train_text_encoder = bool(network.text_encoder_adapters)
    data = setup.build_training_data(
        config, report.items, sd, global_batch, is_main, accelerator.wait_for_everyone,
        setup.reg_items(report))
    if not train_text_encoder and not data.captions.is_random:
        step_context.text_cache = frozen_text_cache(config, sd)

    # 3. Optimizer and schedule.
    from trainer.optim import build_optimizer, build_scheduler

    groups = network.parameter_groups(config.train.unet_lr, config.train.text_encoder_lr)
    optimizer = build_optimizer(config.train.optimizer, groups, config.train.weight_decay)
    scheduler = build_scheduler(
        config.train.scheduler, optimizer, config.train.warmup_steps, total_steps
    )

    if config.task == "lcm_distill" and config.lcm.target_ema:
        step_context.lcm_target = EmaTarget.of_network(network, config.lcm.target_ema)

    # 4. Resume from the newest complete state.
    progress = Progress(step=0, epoch=0, batch=0)
    if resume:
        loaded = load_latest_state(outputs.state_root)
        restore_weights(network, step_context.lcm_target, loaded.adapter, outputs.state_root)
        optimizer.load_state_dict(loaded.training["optimizer"])
        scheduler.load_state_dict(loaded.training["scheduler"])
        restore_rng_states(loaded.training["rng"])
        progress = loaded.progress
    # From here on the run writes its outputs: a signal stops it at a step boundary.
    stop.arm()
    if is_main:
        outputs.write_config(config_to_toml(config))
        outputs.start_metrics(progress.step)
    validation = (RunValidation(config, validation_items, sd, outputs, progress.step)
                  if is_main and validation_items else None)

    # 5. Train.
    from datasets_tools.sampler import Position
    from trainer.compile import step_unet

    step_context.unet = step_unet(config, sd.unet, network, data, is_main)

    network.train()
    sd.unet.train()
    bar = guard.close_on_exit(
        tqdm(total=total_steps, initial=progress.step, disable=not is_main, desc="training"))
    losses: list[float] = []
    save_every = config.output.save_every_n_steps
    state_every = config.train.save_state_every_n_steps or save_every
    every = config.sample.every_n_steps
    # Processes must read (and so stop on a bad loss) at the same steps: no clock.
    readout = LossReadout(every_s=READ_EVERY_S if world == 1 else math.inf)
    batches = data.batches(start=Position(progress.epoch, progress.batch))
    micro_losses: list[torch.Tensor] = []
    stopped_early = False

    def read_losses() -> None:
        records, bad = checked(readout.read())
        losses.extend(r.loss for r in records)
        if is_main:
            log_steps(outputs, bar, records, total_steps)
        if bad is not None:
            raise diverged(bad, outputs.folder)

    def save_progress() -> None:  # the state at `progress`, the last completed step
        weights = training_weights(network, step_context.lcm_target)
        save_state(outputs.state_root, progress, weights, optimizer, scheduler)

    guard.training(progress.step, force=True)
    for micro_index, tb in enumerate(batches):
        step = progress.step
        global_count = len(tb.batch.items)
        mine = slice(rank * config.train.batch_size, (rank + 1) * config.train.batch_size)
        generator = step_generator(config.train.seed, step, micro_index % config.train.grad_accum)
        if micro_index % config.train.grad_accum == 0:  # an OOM saves the RNG as it was here
            rng_at_step = rng_states()
        try:  # out of memory here leaves the last completed step intact (trainer/oom.py)
            loss_sum = training_loss(
                config, sd, network, tb, mine, generator, train_text_encoder, step_context
            )
            injected_oom(config, step + 1)
            scaled = loss_sum / (global_count * config.train.grad_accum)
            step_context.scaler.scale(scaled).backward()
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            loss_sum = micro_losses = None  # the failed step's graph
            optimizer.zero_grad(set_to_none=True)
            raise stop_after_oom(exc, Attempt(config, step + 1, step, resume, world, losses),
                                 outputs.state_root, read_losses, rng_at_step,
                                 is_main and save_progress) from None
        micro_losses.append(loss_sum.detach() / global_count)
        if (micro_index + 1) % config.train.grad_accum:
            continue

        # One optimizer step: sum the slices' gradients, clip, step. The loss
        # stays on the device until the readout reads it (trainer/loss_readout.py).
        sync_gradients(network, world)
        loss = sum_across(torch.stack(micro_losses).mean(), world)
        micro_losses = []
        step_context.scaler.unscale_(optimizer)
        if config.train.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(network.parameters(), config.train.max_grad_norm)
        step_context.scaler.step(optimizer)
        step_context.scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step_context.lcm_target is not None:
            step_context.lcm_target.update()
        next_position = tb.batch.next_position
        progress = Progress(step=step + 1, epoch=next_position.epoch, batch=next_position.batch)
        readout.add(progress.step, loss, scheduler.get_last_lr()[0], progress.epoch)
        if is_main:
            bar.update(1)

        # Reading the losses, previews and saving (main process). Every write
        # comes after a read: nothing is saved from past a non-finite loss.
        stop_now = stop_requested(stop, world, accelerator.device) or progress.step == stop_at_step
        finished = progress.step >= total_steps
        previews_due = bool(config.sample.prompts and every) and (
            progress.step % every == 0 or finished)
        export_due = bool(save_every) and progress.step % save_every == 0 and not finished
        # A finished run's state is saved after its final file: a state at the
        # last step says the run is done, and --resume then refuses.
        periodic_state = bool(state_every) and progress.step % state_every == 0
        state_due = not finished and (stop_now or periodic_state)
        val_due = validation_due(config, bool(validation_items), progress.step, finished)
        if (readout.due() or finished or stop_now or previews_due or export_due or state_due
                or val_due):
            read_losses()
        if is_main and previews_due:
            write_previews(config, sd, network, outputs, progress.step)
        if is_main and export_due:
            export(config, network, outputs, outputs.periodic_file(progress.step), report, progress)
            outputs.remember_periodic(outputs.periodic_file(progress.step))
        if is_main and state_due:
            save_progress()
        if validation is not None and val_due:  # after the step's file: validation.json names it
            validation.evaluate(config, sd, network, step_context, progress.step, total_steps)
        guard.training(progress.step, force=state_due)
        if finished or stop_now:
            stopped_early = not finished
            break
    bar.close()

    final_file = None
    if is_main and not stopped_early:
        final_file = outputs.final_file
        export(config, network, outputs, final_file, report, progress)
        outputs.final_written = True
        save_progress()
    if is_main:
        outputs.close()
    accelerator.wait_for_everyone()
    return RunResult(progress.step, final_file, losses, stopped_early, is_main)


def log_steps(outputs, bar, records, total_steps: int) -> None:
    for record in records:
        outputs.log(record.step, loss=record.loss, lr=record.lr, it_s=1 / max(record.seconds, 1e-9),
                    eta_s=record.seconds * (total_steps - record.step), epoch=record.epoch)
    if records:
        bar.set_postfix(loss=f"{records[-1].loss:.4f}", lr=f"{records[-1].lr:.2e}")


def write_previews(config, sd, network, outputs, step: int) -> None:
    """Previews with the adapter as trained so far; in 4 LCM steps when the run
    distils an LCM-LoRA or `sample.lcm_lora` names one (attached only meanwhile)."""
    from networks.export import load_network
    from trainer.compare_grid import without_images, write_compare_grid
    from trainer.preview import preview_settings
    from trainer.sampling import generate

    lcm_network = None
    if config.task != "lcm_distill" and config.sample.lcm_lora:
        lcm_network = load_network(config.sample.lcm_lora, sd.unet, sd.text_encoder).attach()
        lcm_network.to(sd.unet.device)
    network.eval()
    try:
        images = generate(sd, preview_settings(config))
        without = without_images(config, sd, network)  # sample.compare; rendered once
    finally:
        network.train()
        if lcm_network is not None:
            lcm_network.detach()
    outputs.save_previews(step, images)
    if without is not None:
        write_compare_grid(outputs, step, without, config.sample.every_n_steps)


def export(config, network, outputs, path, report, progress) -> None:
    from networks.export import export_network
    from trainer.export_info import export_info

    info = export_info(config, report, progress)
    export_network(network, path, info, config.output.save_precision, advice=SAVE_ADVICE)
