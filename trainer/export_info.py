"""The run's facts for the exported file's metadata (docs/FORMATS.md "Metadata")."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from core.hashing import file_sha256
from networks.metadata import ExportInfo

_STARTED_AT = datetime.now(UTC)
LCM_COMMENT = (
    "LCM-LoRA: sample with the LCM scheduler in 4-8 steps at guidance 1-2; "
    "combine with a style LoRA by adding both."
)


def export_info(config, report, progress) -> ExportInfo:
    from datasets_tools.captions import tag_frequency
    from trainer.train_setup import model_path

    t = config.train
    base = model_path(config)
    lcm = config.task == "lcm_distill"
    return ExportInfo(
        title=config.output.title or config.output.name,
        output_name=config.output.name,
        base_model_name=base.name,
        base_model_sha256=_base_model_hash(base),
        v_parameterization=config.model.v_parameterization,
        resolution=config.dataset.resolution,
        author=config.output.author,
        description=config.output.description,
        trigger_phrase=config.output.trigger_words or config.dataset.trigger_word,
        clip_skip=config.model.clip_skip,
        comment=LCM_COMMENT if lcm else "",
        usage_hint=LCM_COMMENT if lcm else "",
        tags="lcm-lora" if lcm else "",
        tag_frequency=tag_frequency(report.items),
        started_at=_STARTED_AT,
        training={
            "steps": progress.step,
            "epoch": progress.epoch,
            "num_train_images": len(report.items),
            "learning_rate": t.unet_lr,
            "unet_lr": t.unet_lr,
            "text_encoder_lr": t.text_encoder_lr,
            "lr_scheduler": t.scheduler,
            "optimizer": t.optimizer,
            "mixed_precision": t.mixed_precision,
            # model.base_precision as set (next to ss_mixed_precision, which
            # resolves "auto"); ss_fp8_base is kohya's own key for an fp8 base.
            "base_precision": config.model.base_precision,
            "fp8_base": str(config.model.base_precision == "fp8"),
            "seed": t.seed,
            "noise_offset": t.noise_offset,
            "min_snr_gamma": t.min_snr_gamma,
            "batch_size_per_device": t.batch_size,
            "gradient_accumulation_steps": t.grad_accum,
            "masked_loss": str(config.dataset.masked_loss),  # kohya's key and spelling
            **({"lcm_lora": "True"} if lcm else {}),
            **reg_metadata(config, report),
        },
    )


def reg_metadata(config, report) -> dict[str, str]:
    """kohya's keys for dataset.reg_path (train_network.py): ss_num_reg_images is the
    reg images with their folder repeats (before balancing against the training set),
    ss_reg_dataset_dirs per folder {"n_repeats", "img_count"}. Absent without a reg folder."""
    import json

    reg = getattr(report, "reg", None)
    if reg is None:
        return {}
    dirs: dict[str, dict[str, int]] = {}
    for item in reg.items:
        entry = dirs.setdefault(item.folder, {"n_repeats": item.repeats, "img_count": 0})
        entry["img_count"] += 1
    return {"num_reg_images": str(sum(i.repeats for i in reg.items)),
            "reg_dataset_dirs": json.dumps(dirs),
            "prior_loss_weight": str(config.train.prior_loss_weight)}


_hash_cache: dict[Path, str] = {}


def _base_model_hash(path: Path) -> str:
    """sha256 of a single-file checkpoint (what A1111 and Civitai show);
    empty for a diffusers folder, which has no one file to hash."""
    if not path.is_file():
        return ""
    if path not in _hash_cache:
        _hash_cache[path] = file_sha256(str(path))
    return _hash_cache[path]
