"""`python -m trainer sample`: one image from a base model with LoRAs merged in.

With `--lcm-lora` the LCM scheduler samples in 4 steps without CFG
(the LCM-LoRA report, arXiv:2311.05556); otherwise Euler ancestral, 20 steps, guidance 7.
`--compare` writes it beside the same seed's image without the LoRAs.
Every argument is checked before the model loads, so mistakes fail fast.
Heavy imports (torch, diffusers) wait until then too.
"""

from __future__ import annotations

import argparse
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

from core.errors import UserError
from trainer.demo_assets import MODEL_KEYWORDS, builtin_model

# (steps, guidance) when not given: LCM-LoRA's 4 steps without CFG, else
# the usual SD1.5 settings.
LCM_DEFAULTS = (4, 1.0)
PLAIN_DEFAULTS = (20, 7.0)
# LCMScheduler picks its steps from a 50-point grid (`original_inference_steps`).
LCM_MAX_STEPS = 50
PLAIN_SAMPLERS = ("euler_a", "ddim")


def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, metavar="M",
        help='SD 1.x .safetensors file or diffusers folder, or "demo" for the built-in tiny model '
             '("demo-shapes": the toy that draws coloured shapes)',
    )  # fmt: skip
    parser.add_argument(
        "--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
        help="LoRA/LyCORIS file merged in at WEIGHT (default 1.0); repeatable",
    )  # fmt: skip
    parser.add_argument(
        "--lcm-lora", metavar="FILE[:WEIGHT]",
        help="an LCM-LoRA: sample with the LCM scheduler (default 4 steps, guidance 1.0)",
    )  # fmt: skip
    parser.add_argument(
        "--prompt", required=True, metavar="TEXT",
        help="may end in kohya options, which win over the ones below: --n negative, --w/--h "
             "size, --s steps, --l guidance, --d seed (e.g. 'a cat --w 512 --d 42')",
    )  # fmt: skip
    parser.add_argument("--negative", default="", metavar="TEXT", help="negative prompt")
    parser.add_argument("--steps", type=int, metavar="N", help="default 20, or 4 with --lcm-lora")
    parser.add_argument(
        "--guidance", type=float, metavar="G",
        help="CFG scale; <= 1 disables CFG and the negative prompt (default 7.0, 1.0 with LCM)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=1234, metavar="S", help="default 1234")
    parser.add_argument("--size", default="512x512", metavar="WxH", help="default 512x512")
    parser.add_argument(
        "--sampler", choices=PLAIN_SAMPLERS,
        help="default euler_a; not with --lcm-lora, which always uses the LCM scheduler",
    )  # fmt: skip
    parser.add_argument("--clip-skip", type=int, default=1, metavar="N", help="default 1")
    parser.add_argument("--out", required=True, metavar="PNG", help="the image to write")
    parser.add_argument(
        "--preview-decoder", default="", metavar="DIR",
        help="decode with TAESD (a diffusers AutoencoderTiny folder): faster, a little softer",
    )  # fmt: skip
    parser.add_argument(
        "--compare", action="store_true",
        help="write the image with the LoRAs next to the one without them (same seed; an "
             "--lcm-lora stays in both)",
    )  # fmt: skip


@dataclass(frozen=True)
class SampleRequest:
    model: str
    adapters: tuple[tuple[Path, float], ...]  # (file, weight), the LCM-LoRA last
    settings: object  # trainer.sampling.SampleSettings
    out: Path


def parse_adapter(text: str, option: str) -> tuple[Path, float]:
    """FILE or FILE:WEIGHT. A path that exists as written wins, so Windows
    drive letters (C:\\...) need no weight."""
    if Path(text).is_file() or ":" not in text:
        path, weight = Path(text), 1.0
    else:
        head, _, tail = text.rpartition(":")
        try:
            path, weight = Path(head), float(tail)
        except ValueError:
            raise UserError(
                f"{option} {text}: {tail!r} after the last ':' is not a number; write FILE or "
                "FILE:WEIGHT with WEIGHT a number such as 0.8 (and check that FILE exists)."
            ) from None
        if not math.isfinite(weight):
            raise UserError(f"{option} {text}: the weight must be a finite number such as 0.8.")
    if not path.is_file():
        raise UserError(f"{option}: {path} does not exist; expected a LoRA .safetensors file.")
    return path, weight


def parse_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match:
        raise UserError(f"--size {text!r} is not WxH; write e.g. --size 512x768.")
    width, height = int(match[1]), int(match[2])
    if width < 8 or height < 8 or width % 8 or height % 8:
        raise UserError(
            f"--size {text}: width and height must be positive multiples of 8 (the VAE's "
            "downscaling factor), e.g. 512x512 or 512x768."
        )
    return width, height


def check_output(text: str) -> Path:
    out = Path(text).expanduser()
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out}: the output must be a .png file name.")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name such as {out / 'sample.png'}.")
    folder = out.parent
    if not folder.is_dir():
        raise UserError(f"--out {out}: the folder {folder} does not exist; create it first.")
    if not _can_write_in(folder):
        raise UserError(f"--out {out}: cannot write in {folder}; choose a folder you can write to.")
    return out


def _can_write_in(folder: Path) -> bool:
    # Trying is the only reliable test: os.access says yes to root, even
    # on read-only file systems.
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def build_request(args: argparse.Namespace) -> SampleRequest:
    """Every argument checked, defaults resolved; nothing loaded yet."""
    from trainer.prompt_options import PromptOptionError, parse_prompt

    try:
        parse_prompt(args.prompt)
    except PromptOptionError as exc:
        raise UserError(f'--prompt "{args.prompt}": {exc.reason}.') from None
    lcm = args.lcm_lora is not None
    if lcm and args.sampler:
        raise UserError(
            f"--sampler {args.sampler} cannot be combined with --lcm-lora: an LCM-LoRA samples "
            "with the LCM scheduler. Leave out --sampler."
        )
    adapters = [parse_adapter(text, "--lora") for text in args.lora]
    if lcm:
        adapters.append(parse_adapter(args.lcm_lora, "--lcm-lora"))
    default_steps, default_guidance = LCM_DEFAULTS if lcm else PLAIN_DEFAULTS
    steps = default_steps if args.steps is None else args.steps
    guidance = default_guidance if args.guidance is None else args.guidance
    if steps < 1:
        raise UserError(f"--steps {steps}: at least 1 sampling step is needed.")
    if lcm and steps > LCM_MAX_STEPS:
        raise UserError(f"--steps {steps}: the LCM scheduler takes at most {LCM_MAX_STEPS} steps.")
    if not (math.isfinite(guidance) and guidance >= 0):
        raise UserError(f"--guidance {guidance}: use a number >= 0 (1.0 to 2.0 with an LCM-LoRA).")
    if args.clip_skip < 1:
        raise UserError(f"--clip-skip {args.clip_skip}: use 1 (no skip) or more.")
    if args.model not in MODEL_KEYWORDS and not Path(args.model).expanduser().exists():
        raise UserError(
            f"--model {args.model} does not exist; expected an SD 1.x .safetensors file, a "
            'diffusers folder, "demo" or "demo-shapes".'
        )
    width, height = parse_size(args.size)
    out = check_output(args.out)
    if args.preview_decoder:
        from trainer.preview_decoder import check_decoder_folder

        check_decoder_folder(args.preview_decoder, "--preview-decoder")
    from trainer.sampling import SampleSettings, per_prompt  # imports torch: after the checks

    settings = SampleSettings(
        prompts=(args.prompt,),
        negative_prompt=args.negative,
        steps=steps,
        guidance=guidance,
        sampler="lcm" if lcm else (args.sampler or "euler_a"),
        seed=args.seed,
        width=width,
        height=height,
        clip_skip=args.clip_skip,
        decoder=args.preview_decoder,
    )
    # The prompt's own options applied, so that the summary printed says what was made.
    return SampleRequest(args.model, tuple(adapters), per_prompt(settings)[0], out)


def load_model(model: str):
    from trainer.model_loading import load_sd_model

    return load_sd_model(builtin_model(model) or model)


def write_png(image, out: Path) -> None:
    import io

    from core.atomic import atomic_write_bytes

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(out, buffer.getvalue())


def run_sample(args: argparse.Namespace) -> Path:
    from trainer.merge import merge_adapters
    from trainer.sampling import generate

    request = build_request(args)
    started = time.perf_counter()
    sd = load_model(request.model)
    layers = sd.text_encoder.config.num_hidden_layers
    if request.settings.clip_skip > layers:
        raise UserError(
            f"--clip-skip {request.settings.clip_skip}: this text encoder has only {layers} layers."
        )
    if args.compare:
        image = _with_and_without(sd, request)
    else:
        merge_adapters(sd, request.adapters)
        image = generate(sd, request.settings)[0]
    write_png(image, request.out)
    s = request.settings
    print(
        f"wrote {request.out} ({s.width}x{s.height}, {s.sampler}, {s.steps} steps, "
        f"guidance {s.guidance:g}, {time.perf_counter() - started:.1f} s)"
    )
    return request.out


def _with_and_without(sd, request: SampleRequest):
    """`--compare`: the image with the LoRAs, then the one without them, side
    by side (trainer/compare_grid.py). An LCM-LoRA (last) is in both, so it is
    merged before the others: the "with" half may differ from a plain run's
    image in float rounding."""
    from trainer.compare_grid import grid_image
    from trainer.merge import merge_adapters
    from trainer.sampling import generate

    split = len(request.adapters) - (request.settings.sampler == "lcm")
    merge_adapters(sd, request.adapters[split:])
    without = generate(sd, request.settings)[0]
    merge_adapters(sd, request.adapters[:split])
    return grid_image([("", [generate(sd, request.settings)[0]])], [without], corner="")
