"""`python -m networks convert IN --out OUT.safetensors [--precision P] [--drop-unknown]`.

Prints what the input was, the modules mapped per kind of change and any
keys dropped; `wrote: PATH` is the last line on stdout (the GUI's Tools tab
reads it). Progress lines per module on stderr.
"""

from __future__ import annotations

import argparse

COMMAND = "convert"
HELP = "convert a diffusers/PEFT, LDM-named or misnamed LoRA file to the kohya layout"
DESCRIPTION = (
    "Rewrite an SD 1.x adapter file made by another tool in the kohya layout A1111, "
    "ComfyUI, diffusers and this trainer read: diffusers/PEFT LoRA files (or a PEFT "
    "save_pretrained folder with adapter_config.json), LDM-style U-Net names "
    "(lora_unet_input_blocks_...), text-encoder names without text_model_ "
    "(lora_te_encoder_...) and lycoris_ prefixes. The input kind is detected from its keys. "
    "Keys that map to no layer are refused, or left out with --drop-unknown."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="IN", help="adapter .safetensors file or PEFT folder")
    parser.add_argument("--out", required=True, help="the converted .safetensors file")
    parser.add_argument("--precision", choices=("fp16", "bf16", "fp32"), default=None,
                        help="tensor precision of the output (default: the input's)")
    parser.add_argument("--drop-unknown", action="store_true",
                        help="write the file without the keys that map to no layer, listing them")


def run(args: argparse.Namespace) -> int:
    from .convert import convert_file

    conversion = convert_file(args.input, args.out, args.precision, args.drop_unknown)
    print(f"input: {conversion.source} ({conversion.kind})")
    for kind, count in conversion.counts.items():
        print(f"mapped: {count} modules, {kind}")
    if conversion.dropped:
        print(f"dropped: {len(conversion.dropped)} unknown keys:")
        for key in conversion.dropped:
            print(f"  {key}")
    for note in conversion.notes:
        print(f"note: {note}")
    print(f"wrote: {args.out}")
    return 0
