"""What to change when the estimate does not fit: the changes in the order
that costs least first (speed before quality), each applied on top of the
ones before and re-estimated, until the run fits or nothing is left."""

from __future__ import annotations

from collections.abc import Callable


def _changes(config, device: str) -> list[tuple[str, dict]]:
    """(what to say, {section.key: value}) in order, only those that apply."""
    t, d = config.train, config.dataset
    changes = []
    if not t.gradient_checkpointing:
        changes.append(("turn on train.gradient_checkpointing (slower steps)",
                        {"train.gradient_checkpointing": True}))
    if t.batch_size > 1:
        batch = max(1, t.batch_size // 2)
        accum = t.grad_accum * t.batch_size // batch
        changes.append((f"set train.batch_size = {batch} with train.grad_accum = {accum} "
                        "(the same effective batch)",
                        {"train.batch_size": batch, "train.grad_accum": accum}))
    if d.cache_latents == "off":
        changes.append(('set dataset.cache_latents = "disk"', {"dataset.cache_latents": "disk"}))
    if device == "cuda" and config.model.base_precision not in ("fp8", "nf4"):
        changes.append(('set model.base_precision = "fp8" (a quantized frozen base)',
                        {"model.base_precision": "fp8"}))
    for smaller in (d.resolution * 3 // 4 // 64 * 64, d.resolution // 2 // 64 * 64):
        if 64 <= smaller < d.resolution:
            changes.append((f"lower dataset.resolution to {smaller}",
                            {"dataset.resolution": smaller,
                             "dataset.min_bucket": min(d.min_bucket, smaller)}))
            break
    return changes


def _apply(config, values: dict):
    data = config.model_dump()
    for key, value in values.items():
        section, name = key.split(".")
        data[section][name] = value
    return type(config).model_validate(data)


def advice(config, result, total_of: Callable) -> str:
    """One paragraph: how much is missing and the changes that close the gap."""
    from trainer.estimate import format_bytes

    available = result.available_bytes
    said, current = [], config
    for words, values in _changes(config, result.device):
        try:
            current = _apply(current, values)
        except ValueError:  # e.g. buckets that no longer fit the smaller resolution
            continue
        total = total_of(current)
        said.append(f"{words}: {format_bytes(total)}")
        if total <= available:
            break
    else:
        total = None
    short = format_bytes(result.total_bytes - available)
    text = (f"This run needs about {format_bytes(result.total_bytes)} but "
            f"{format_bytes(available)} is available ({short} short). ")
    if not said:
        return text + ("Nothing in the config lowers it further: close other programs, or "
                       "train on a machine with more memory.")
    text += "In this order, each on top of the ones before: " + "; ".join(said) + ". "
    if total is not None and total <= available:
        return text + "With these changes it fits."
    return text + ("Even with all of them it does not fit: close other programs, use a "
                   "smaller rank, or train on a machine with more memory.")
