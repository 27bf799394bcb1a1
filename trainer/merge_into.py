"""`python -m trainer merge-into`: bake LoRAs into a base model, written as a
new checkpoint.

The merge is the runtime one (`trainer.merge.merge_adapters`: LoRA, LoCon,
LoHa, LoKr, DoRA with its own formula), done in fp32 and cast once to
`--precision` at the end, so the file computes what A1111 and ComfyUI compute
with the LoRAs applied at those weights.

The single file is in the original LDM layout (`model.diffusion_model.*`,
`first_stage_model.*`, `cond_stage_model.transformer.text_model.*`), the key
set `trainer.demo_model.single_file_state_dict` writes and A1111, ComfyUI and
our loader read. When the base is a single file, its keys outside those three
parts (`alphas_cumprod`, `betas`, `model_ema.*`, ...) are carried over
unchanged and uncast, as kohya's checkpoint saving does: a loader that reads
them finds what the base had (an EMA copy, if any, is the base's, without the
LoRAs; A1111 and ComfyUI sample with the non-EMA weights). The header records
the base and each LoRA with its weight (`modelspec.merged_from`,
`lora_merge`). With `--diffusers` the output is a diffusers folder instead,
built in a staging folder next to `--out` and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from core.atomic import failure_reason
from core.errors import UserError
from core.tool_progress import report

PRECISIONS = ("fp16", "bf16", "fp32")
SUFFIX = ".safetensors"
# modelspec's implementation for an SD checkpoint in the LDM layout (kohya's
# sai_model_spec uses the same string for checkpoints).
LDM_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"
MERGE_KEY = "lora_merge"
MERGE_INFO_FILE = "lora_merge.json"
STAGES = 6  # load, merge, U-Net, VAE, text encoder, write


@dataclass(frozen=True)
class MergeRequest:
    model: Path
    adapters: tuple[tuple[Path, float], ...]  # (file, weight)
    out: Path
    precision: str = "fp16"
    diffusers: bool = False


def _same(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_request(request: MergeRequest) -> None:
    """Every argument mistake as a UserError, before any model loads."""
    from networks.file_header import check_adapter_file

    if request.precision not in PRECISIONS:
        raise UserError(f"--precision {request.precision}: choose one of {', '.join(PRECISIONS)}.")
    if not request.model.exists():
        raise UserError(
            f"--model {request.model} does not exist; expected an SD 1.x .safetensors "
            "checkpoint or a diffusers folder containing model_index.json."
        )
    if not request.adapters:
        raise UserError("give at least one --lora FILE[:WEIGHT] to merge into --model.")
    for path, _ in request.adapters:
        check_adapter_file(path, "--lora", "give a LoRA/LyCORIS .safetensors adapter file")
    out = request.out
    inputs = [request.model, *(path for path, _ in request.adapters)]
    if any(_same(out, path) or out.resolve() == path.resolve() for path in inputs):
        raise UserError(f"--out {out} is one of the inputs; choose a new name for the output.")
    if request.diffusers:
        _check_folder_output(out)
    else:
        _check_file_output(out)


def _check_file_output(out: Path) -> None:
    if out.suffix.lower() != SUFFIX:
        raise UserError(
            f"--out {out}: a single-file checkpoint is written as .safetensors; name it e.g. "
            f"{out.with_suffix(SUFFIX).name} (or add --diffusers to write a diffusers folder)."
        )
    if out.is_dir():
        raise UserError(
            f"--out {out} is a folder; give a file name such as {out / 'merged.safetensors'}, "
            "or add --diffusers to write a diffusers folder there."
        )


def _check_folder_output(out: Path) -> None:
    if out.suffix.lower() == SUFFIX:
        raise UserError(
            f"--out {out}: with --diffusers the output is a folder; give a folder name without "
            f"{SUFFIX}, or leave out --diffusers to write a single file."
        )
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; with --diffusers give a folder name.")
    if out.is_dir() and any(out.iterdir()) and not (out / "model_index.json").is_file():
        raise UserError(
            f"--out {out} is a folder that is not a diffusers model; choose a new or empty "
            "folder (an existing diffusers model folder there is replaced)."
        )


def merge_into(request: MergeRequest) -> Path:
    """Write the merged checkpoint and return its path."""
    check_request(request)
    import torch

    from networks.kohya_file import SAVE_PRECISIONS
    from trainer.merge import merge_adapters
    from trainer.model_loading import load_sd_model

    sd = load_sd_model(request.model)
    report(1, STAGES, f"loaded {request.model.name}")
    merge_adapters(sd, request.adapters)
    report(2, STAGES, f"merged {len(request.adapters)} adapter file(s)")
    dtype = SAVE_PRECISIONS[request.precision]
    metadata = merge_metadata(request, sd.prediction_type)
    with torch.no_grad():
        if request.diffusers:
            write_diffusers(sd, request.out, dtype, metadata)
        else:
            write_single_file(sd, request, dtype, metadata)
    report(STAGES, STAGES, f"wrote {request.out.name}")
    return request.out


def merge_metadata(request: MergeRequest, prediction_type: str) -> dict[str, str]:
    """The header: modelspec facts of a checkpoint plus what was merged."""
    from networks.file_header import read_header

    loras = []
    for path, weight in request.adapters:
        meta = read_header(path).metadata
        entry = {"file": path.name, "weight": weight}
        if meta.get("sshs_model_hash"):
            entry["sshs_model_hash"] = meta["sshs_model_hash"]
        loras.append(entry)
    names = [request.model.name, *(f"{e['file']}:{e['weight']:g}" for e in loras)]
    record = {"base": request.model.name, "loras": loras, "precision": request.precision}
    return {
        "format": "pt",
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": "stable-diffusion-v1",
        "modelspec.implementation": LDM_IMPLEMENTATION,
        "modelspec.title": request.out.stem,
        "modelspec.date": datetime.now(UTC).isoformat(timespec="seconds"),
        "modelspec.resolution": "512x512",
        "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
        "modelspec.merged_from": ", ".join(names),
        MERGE_KEY: json.dumps(record),
    }


def _cast(state: dict, dtype, part: str) -> dict:
    """Floating tensors to `dtype`; an overflow (fp16's 65504) is refused."""
    import torch

    out = {}
    for key, value in state.items():
        if value.is_floating_point():
            value = value.detach().to(dtype)
            if not torch.isfinite(value).all():
                raise UserError(
                    f"The merged {part} weight {key} overflows {dtype} (NaN/Inf after the "
                    "cast); use --precision bf16 or fp32, or lower the LoRA weights."
                )
        out[key] = value.contiguous()
    return out


def ldm_tensors(sd, dtype) -> dict:
    """The merged U-Net, VAE and text encoder as LDM-layout tensors in `dtype`."""
    from trainer.ldm_keys import text_encoder_to_ldm, unet_to_ldm, vae_to_ldm

    unet = sd.unet
    tensors = _cast(unet_to_ldm(unet.state_dict(), unet.config.layers_per_block), dtype, "U-Net")
    report(3, STAGES, "U-Net converted")
    tensors |= _cast(vae_to_ldm(sd.vae.state_dict()), dtype, "VAE")
    report(4, STAGES, "VAE converted")
    tensors |= _cast(text_encoder_to_ldm(sd.text_encoder.state_dict()), dtype, "text encoder")
    report(5, STAGES, "text encoder converted")
    return tensors


def carried_tensors(model: Path) -> dict:
    """The base single file's tensors outside the U-Net, VAE and text encoder."""
    from safetensors import safe_open

    from trainer.checkpoint_io import TEXT_ROOT_PREFIX
    from trainer.ldm_keys import UNET_PREFIX, VAE_PREFIX

    if model.is_dir():
        return {}
    parts = (UNET_PREFIX, VAE_PREFIX, TEXT_ROOT_PREFIX)
    with safe_open(str(model), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys() if not k.startswith(parts)}


def write_single_file(sd, request: MergeRequest, dtype, metadata: dict[str, str]) -> None:
    tensors = carried_tensors(request.model)
    tensors |= ldm_tensors(sd, dtype)
    save_atomically(tensors, request.out, metadata)


def save_atomically(tensors: dict, path: Path, metadata: dict[str, str]) -> None:
    """safetensors `save_file` into `.NAME.partial` next to `path`, fsync, rename:
    no second in-memory copy of a multi-GB file, and never half a file at `path`."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    try:
        save_file(tensors, str(partial), metadata=metadata)
        with open(partial, "rb") as handle:
            os.fsync(handle.fileno())
        partial.chmod(0o644)  # as core.atomic: outputs are not secret
        os.replace(partial, path)
    except (OSError, SafetensorError) as exc:
        partial.unlink(missing_ok=True)
        raise UserError(
            f"Writing {path} failed ({failure_reason(exc, path.parent)}); the previous file, if "
            "any, is untouched. Free some disk space or choose another folder."
        ) from exc
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _scheduler(sd):
    import diffusers

    name = sd.scheduler_config.get("_class_name", "PNDMScheduler")
    cls = getattr(diffusers, name, None) or diffusers.PNDMScheduler
    return cls.from_config(sd.scheduler_config)


def write_diffusers(sd, out: Path, dtype, metadata: dict[str, str]) -> None:
    """`save_pretrained` of the merged pipeline into a staging folder next to
    `out`, then renamed into place."""
    from trainer.model_loading import build_pipeline
    from trainer.tokenizer import write_tokenizer_files

    parts = (("U-Net", sd.unet), ("VAE", sd.vae), ("text encoder", sd.text_encoder))
    for stage, (part, module) in enumerate(parts, start=3):
        module.to(dtype)
        _cast(module.state_dict(), dtype, part)  # the overflow check only
        report(stage, STAGES, f"{part} cast")
    pipe = build_pipeline(sd, scheduler=_scheduler(sd))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the model is not secret
    try:
        pipe.save_pretrained(staging, safe_serialization=True)
        # transformers 5 saves only tokenizer.json; vocab.json + merges.txt
        # keep the folder readable by older tools too (as make-demo-model).
        write_tokenizer_files(staging / "tokenizer")
        (staging / MERGE_INFO_FILE).write_text(json.dumps(metadata, indent=1), encoding="utf-8")
        _swap_in(staging, out)
    except OSError as exc:
        raise UserError(
            f"Writing {out} failed ({failure_reason(exc, out.parent)}); free some disk space or "
            "choose another folder."
        ) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _swap_in(staging: Path, out: Path) -> None:
    """Rename `staging` to `out`; a model folder already there moves aside
    first and comes back if the rename fails."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}-old-{int(time.time())}")
        out.rename(old)
    try:
        staging.rename(out)
    except OSError:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
