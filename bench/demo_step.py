"""What the per-feature benches on the demo model share: the trainer's own
pieces of a run built from a config (model, adapter, data, step context), and
one timed training step through `trainer.step_loss.training_loss`, the same
loss, backward and optimizer step the loop runs."""

from __future__ import annotations

import time

import torch


def run_parts(config, batch_size: int, reg: bool = False):
    """(sd, network, data, ctx) of `config` as `trainer.train` builds them."""
    from trainer import train_setup as setup
    from trainer.step_loss import StepContext

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = setup.check_dataset_or_refuse(config)
    sd = setup.load_model(config, device)
    network = setup.build_network(config, sd)
    data = setup.build_training_data(config, report.items, sd, batch_size, True, lambda: None,
                                     setup.reg_items(report) if reg else ())
    return report, sd, network, data, StepContext(device, config.train.mixed_precision)


def timed_step(config, sd, network, next_batch, optimizer, ctx, step: int = 0) -> float:
    """Seconds of one training step, the batch load `next_batch()` included
    (the device synchronised)."""
    from trainer.step_loss import step_generator, training_loss

    sync(ctx.device)
    start = time.perf_counter()
    tb = next_batch()
    loss = training_loss(config, sd, network, tb, slice(0, len(tb.captions)),
                         step_generator(config.train.seed, step, 0), False, ctx)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync(ctx.device)
    return time.perf_counter() - start


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
