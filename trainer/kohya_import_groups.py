"""kohya options that map together (the network's are in
`trainer.kohya_import_network`): each function takes its options out of
`args` (so they are not read again as single options) and sets the preset's
values, or says why not, in the `Draft`.

`gui` is true for a kohya_ss GUI JSON, whose every field is present ("" or 0
when empty); an sd-scripts TOML leaves options out, and `defaults` then says
to write kohya's own default where ours differs (sd-scripts' argparse defaults).
"""

from __future__ import annotations

import math
import re
import shlex

from trainer.kohya_import_draft import Draft, flag, inactive, number, show, unset
from trainer.kohya_import_tables import OPTIMIZER_REASONS, OPTIMIZERS, SCHEDULERS

KOHYA_LR = 2e-6  # sd-scripts' --learning_rate default


def key_values(value, name: str, draft: Draft) -> dict[str, str]:
    """kohya's "k=v" lists (network_args, optimizer_args): a TOML list of
    strings, or the GUI's one line of space-separated pairs."""
    if unset(value):
        return {}
    try:  # the GUI quotes its items: "d0=1e-5" "d_coef=1.0"
        items = value if isinstance(value, list) else shlex.split(str(value))
    except ValueError:
        items = str(value).split()
    pairs: dict[str, str] = {}
    for item in items:
        key, equals, text = str(item).partition("=")
        if not equals or not key.strip():
            draft.skip(name, item, 'not a "name=value" pair')
            continue
        pairs[key.strip()] = text.strip()
    return pairs


def set_number(draft: Draft, key: str, raw, name: str, kind: type) -> None:
    try:
        draft.set_from(key, number(raw, kind), name, raw)
    except ValueError as exc:
        draft.skip(name, raw, f"value not supported: {exc}")


def learning_rates(args: dict, draft: Draft, defaults: bool) -> None:
    """kohya: unet_lr and text_encoder_lr default to learning_rate; 0 or empty
    counts as not given (the GUI writes 0 for an empty field)."""
    given = {n: args.pop(n, None) for n in ("learning_rate", "unet_lr", "text_encoder_lr")}
    base = given["learning_rate"]
    if inactive(base) and defaults:
        base, base_source = KOHYA_LR, "kohya's default learning_rate = 2e-06"
    else:
        base_source = f"learning_rate = {show('', base)}"
    for name, key in (("unet_lr", "train.unet_lr"), ("text_encoder_lr", "train.text_encoder_lr")):
        raw = given[name]
        try:
            if not inactive(raw):
                draft.set_from(key, number(raw, float), name, raw)
            elif not inactive(base):
                draft.set(key, number(base, float), "learning_rate", shown=base_source)
        except ValueError as exc:
            draft.skip(name if not inactive(raw) else "learning_rate", raw or base,
                       f"value not supported: {exc}")
    for name, key in (("network_train_unet_only", "network.train_text_encoder"),
                      ("network_train_text_encoder_only", "network.train_unet")):
        raw = args.pop(name, None)
        if not unset(raw) and flag(raw):
            draft.set_from(key, False, name, raw)


def length(args: dict, draft: Draft) -> int | None:
    """train.steps or train.epochs; the run's step count when it is known.
    As in sd-scripts, max_train_epochs wins over max_train_steps; the GUI's
    `epoch` counts only when no max_train_steps is given (the GUI then
    computes the steps from it)."""
    steps, epochs, gui_epochs = (args.pop(n, None)
                                 for n in ("max_train_steps", "max_train_epochs", "epoch"))
    chosen = [(n, v) for n, v in (("max_train_epochs", epochs), ("max_train_steps", steps),
                                  ("epoch", gui_epochs)) if not inactive(v)]
    if not chosen:
        return 1600 if unset(steps) else None  # sd-scripts' default, ours too
    name, raw = chosen[0]
    for other, value in chosen[1:]:
        draft.skip(other, value, f"kohya uses {name} instead, and so does the preset")
    try:
        count = number(raw, int)
    except ValueError as exc:
        draft.skip(name, raw, f"value not supported: {exc}")
        return None
    if name == "max_train_steps":
        draft.set_from("train.steps", count, name, raw)
        return count
    draft.set_from("train.epochs", count, name, raw)
    draft.set("train.steps", 0, name, shown=f"{name} = {show(name, raw)} counts epochs, "
              "not steps")
    return None


def scheduler(args: dict, draft: Draft, total_steps: int | None, defaults: bool) -> None:
    raw = args.pop("lr_scheduler", None)
    if unset(raw) and defaults:
        draft.set("train.scheduler", "constant", "lr_scheduler",
                  shown='kohya\'s default lr_scheduler = "constant"')
    elif not unset(raw):
        name = str(raw).strip().lower()
        if name in SCHEDULERS:
            draft.set_from("train.scheduler", name, "lr_scheduler", raw)
        else:
            draft.skip("lr_scheduler", raw, "a schedule this trainer does not have (it has "
                       f"{', '.join(SCHEDULERS)}); the preset keeps its default")
    warmup_steps, percent = args.pop("lr_warmup_steps", None), args.pop("lr_warmup", None)
    _warmup(draft, warmup_steps, percent, total_steps)
    chosen = draft.values.get("train.scheduler")
    warmup = draft.values.get("train.warmup_steps")
    if chosen is not None and chosen.value == "constant" and warmup is not None:
        del draft.values["train.warmup_steps"]  # diffusers' constant schedule, kohya's and ours
        draft.unused_by_kohya.append(f"{warmup.source} (the constant schedule has no warmup)")


def _warmup(draft: Draft, warmup_steps, percent, total_steps: int | None) -> None:
    if not inactive(warmup_steps):
        _warmup_steps(draft, warmup_steps, total_steps)
        if not inactive(percent):
            draft.skip("lr_warmup", percent, "kohya uses lr_warmup_steps instead")
    elif not inactive(percent):
        if total_steps is None:
            draft.skip("lr_warmup", percent, "a percentage of the run's steps, which depends "
                       "on the images when the run counts epochs: set train.warmup_steps")
            return
        try:
            count = math.ceil(total_steps * number(percent, float) / 100)
        except ValueError as exc:
            draft.skip("lr_warmup", percent, f"value not supported: {exc}")
            return
        draft.set("train.warmup_steps", count, "lr_warmup",
                  shown=f"lr_warmup = {show('', percent)}% of {total_steps} steps")


def _warmup_steps(draft: Draft, raw, total_steps: int | None) -> None:
    try:
        value = number(raw, float)
    except ValueError as exc:
        draft.skip("lr_warmup_steps", raw, f"value not supported: {exc}")
        return
    if value < 1:  # sd-scripts: a value below 1 is a ratio of the run's steps
        if total_steps is None:
            draft.skip("lr_warmup_steps", raw, "a ratio of the run's steps, which depends on "
                       "the images when the run counts epochs: set train.warmup_steps")
            return
        draft.set("train.warmup_steps", math.ceil(total_steps * value), "lr_warmup_steps",
                  shown=f"lr_warmup_steps = {show('', raw)} of {total_steps} steps")
        return
    set_number(draft, "train.warmup_steps", raw, "lr_warmup_steps", int)


def optimizer(args: dict, draft: Draft, defaults: bool) -> None:
    name, raw = next(((n, args.pop(n)) for n in ("optimizer", "optimizer_type")
                      if n in args and not unset(args[n])), (None, None))
    for old, kohya in (("use_8bit_adam", "AdamW8bit"), ("use_lion_optimizer", "Lion")):
        value = args.pop(old, None)
        if name is None and not unset(value) and flag(value):
            name, raw = old, kohya
    for leftover in ("optimizer", "optimizer_type"):
        args.pop(leftover, None)
    if name is None and not defaults:
        chosen = None
    else:
        text = "AdamW" if name is None else str(raw).strip()
        key = text.lower().removeprefix("torch.optim.")
        chosen = OPTIMIZERS.get(key) or (("sgd", 0.0) if key == "sgd" else None)
        if chosen is None:
            reason = OPTIMIZER_REASONS.get(key, "an optimizer this trainer does not have")
            draft.skip(name, raw, f"{reason} (it has adamw, adamw8bit, prodigy, lion, sgd); "
                                  "the preset keeps adamw")
        else:
            shown = f"optimizer {show('', raw)}" if name else 'kohya\'s default optimizer "AdamW"'
            draft.set("train.optimizer", chosen[0], name or "optimizer_type", shown=shown)
    extra = key_values(args.pop("optimizer_args", None), "optimizer_args", draft)
    decay = extra.pop("weight_decay", None)
    if decay is not None:
        set_number(draft, "train.weight_decay", decay, "optimizer_args weight_decay", float)
    elif chosen is not None:
        draft.set("train.weight_decay", chosen[1], "optimizer_args",
                  shown=f"no optimizer_args weight_decay: {chosen[0]}'s own default, "
                        f"{chosen[1]}, as kohya uses")
    for arg, value in extra.items():
        draft.skip(f"optimizer_args {arg}", value,
                   "optimizer arguments other than weight_decay are the library's defaults here")


def attention(args: dict, draft: Draft) -> None:
    xformers, sdpa = args.pop("xformers", None), args.pop("sdpa", None)
    if isinstance(xformers, str) and xformers.strip().lower() in ("xformers", "sdpa"):
        draft.set_from("train.attention", xformers.strip().lower(), "xformers", xformers)
    elif not unset(xformers) and not isinstance(xformers, str) and flag(xformers):
        draft.set_from("train.attention", "xformers", "xformers", xformers)
    elif not unset(sdpa) and flag(sdpa):
        draft.set_from("train.attention", "sdpa", "sdpa", sdpa)


def cache(args: dict, draft: Draft, defaults: bool) -> None:
    memory, disk = args.pop("cache_latents", None), args.pop("cache_latents_to_disk", None)
    if unset(memory) and unset(disk) and not defaults:
        return
    if not unset(disk) and flag(disk):
        draft.set_from("dataset.cache_latents", "disk", "cache_latents_to_disk", disk)
    elif not unset(memory) and flag(memory):
        draft.set_from("dataset.cache_latents", "memory", "cache_latents", memory)
    else:
        draft.set("dataset.cache_latents", "off", "cache_latents",
                  shown="kohya encodes every step without cache_latents")


def precision(args: dict, draft: Draft, defaults: bool) -> None:
    raw = args.pop("save_precision", None)
    if unset(raw):
        if defaults:  # sd-scripts saves the adapter's own dtype, fp32, by default
            draft.set("output.save_precision", "fp32", "save_precision",
                      shown="kohya's default save_precision (float)")
        return
    value = {"float": "fp32", "fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}.get(
        str(raw).strip().lower())
    if value is None:
        draft.skip("save_precision", raw, "this trainer saves fp16, bf16 or fp32")
    else:
        draft.set_from("output.save_precision", value, "save_precision", raw)


def resolution(args: dict, draft: Draft) -> None:
    raw, name = args.pop("resolution", None), "resolution"
    gui_name = args.pop("max_resolution", None)  # the kohya_ss GUI's name for it
    if unset(raw) and not unset(gui_name):
        raw, name = gui_name, "max_resolution"
    if unset(raw):
        return
    try:
        sizes = [number(part, int) for part in
                 (raw if isinstance(raw, list) else re.split(r"[,x ]+", str(raw).strip()))]
        width, height = (sizes * 2)[:2] if len(sizes) in (1, 2) else (0, 0)
    except ValueError:
        width = height = 0
    if width <= 0 or height <= 0:
        draft.skip(name, raw, 'not a size: kohya writes "W,H" or one number')
        return
    side = min(2048, max(64, round(math.sqrt(width * height) / 64) * 64))
    draft.set_from("dataset.resolution", side, name, raw)
    if (width, height) != (side, side):
        what = "non-square" if width != height else "not a multiple of 64"
        draft.skip(name, raw, f"{what}: this trainer trains at one size, the side of a "
                   f"square of about the same area, multiple of 64: dataset.resolution = {side}"
                   " (buckets still keep each image's aspect ratio)")


def output_name(args: dict, draft: Draft) -> None:
    raw = args.pop("output_name", None)
    if unset(raw):
        return
    safe = re.sub(r"[^\w.+-]+", "_", str(raw).strip()).strip(".") or "my-lora"
    draft.set_from("output.name", safe, "output_name", raw)
    if safe != str(raw):
        draft.skip("output_name", raw, f"not a safe file name here (letters, digits, - _ + .): "
                                       f"output.name = {safe}")
