"""`model.base_precision`: how the frozen U-Net and text encoder are stored.

- auto: in train.mixed_precision's dtype (fp32 for "no"), as before the setting.
- fp32 / bf16 / fp16: stored in that dtype. Under mixed precision autocast
  computes in its dtype whatever the storage; with train.mixed_precision =
  "no" a bf16 base runs in bf16 itself (the step casts its inputs to the
  U-Net's dtype). fp16 needs train.mixed_precision = "fp16": only that turns on
  the gradient scaler that fp16 activations need, and it needs a GPU, so an
  fp16 base is refused on a CPU.
- fp8: every nn.Linear / nn.Conv2d weight as float8_e4m3fn codes with a scale
  per output channel (trainer/quantized_weight.py), upcast per layer to the
  compute dtype (fp32, or train.mixed_precision's); biases, norms and
  embeddings stay in the compute dtype. CPU and CUDA.
- nf4: bitsandbytes 4-bit NormalFloat for the nn.Linear weights (QLoRA), fp8
  for the convolutions (QLoRA and bitsandbytes' layers quantize matrices, and
  4-bit 3x3 kernels are untried here); CUDA only. SD1.5's convs hold 589M of
  its U-Net's 860M weights, so with the text encoder nf4 stores about 0.85 GB
  where fp8 stores 1.0 GB (bf16 compute; estimated, unmeasured).

The adapters always stay fp32 and the VAE fp32 (latents are encoded once, and
an fp16 SD VAE overflows to NaN).
"""

from __future__ import annotations

import torch
from torch import nn

from core.errors import UserError
from trainer.quantized_weight import Fp8Codec, Nf4Codec, QuantizedWeight

STORED_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
QUANTIZED = ("fp8", "nf4")


def check_base_precision(config, device: torch.device) -> None:
    """Refuse, before the model loads, a base precision this run cannot use."""
    base, mixed = config.model.base_precision, config.train.mixed_precision
    if base == "fp16" and mixed != "fp16":
        raise UserError(
            f'model.base_precision = "fp16" with train.mixed_precision = "{mixed}": an fp16 '
            "base computes in fp16, whose small gradients vanish without the gradient scaler "
            'that only train.mixed_precision = "fp16" (a GPU) turns on. Set '
            'train.mixed_precision = "fp16" on a GPU, or use model.base_precision = "bf16", '
            '"fp8" or "auto".'
        )
    if base in QUANTIZED and config.train.compile:
        raise UserError(
            f'model.base_precision = "{base}" with train.compile = true: the compiled step '
            "cannot trace the quantized weights. Set train.compile = false, or "
            'model.base_precision = "bf16" or "auto".'
        )
    if base == "nf4":
        _check_nf4(device)


def _check_nf4(device: torch.device) -> None:
    if device.type != "cuda":
        raise UserError(
            f'model.base_precision = "nf4" needs a CUDA GPU (bitsandbytes\' 4-bit kernels); '
            f'this run is on the {device.type.upper()}. Use model.base_precision = "fp8" (it '
            'works on the CPU too, half the memory of bf16) or "auto".'
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise UserError(
            'model.base_precision = "nf4" needs the bitsandbytes package, which cannot be '
            f"imported here ({exc}). Install it (pip install bitsandbytes) or use "
            'model.base_precision = "fp8".'
        ) from exc


def store_frozen_model(sd, base_precision: str, compute_dtype: torch.dtype,
                       device: torch.device) -> None:
    """Cast or quantize `sd`'s U-Net and text encoder in place, before they
    move to `device`: an fp32 model on the GPU first would make loading the
    run's VRAM peak. Quantized weights are made on `device` a layer at a time."""
    for part in (sd.unet, sd.text_encoder):
        if base_precision in QUANTIZED:
            quantize_layers(part, base_precision, compute_dtype, device)
        dtype = STORED_DTYPES.get(base_precision, compute_dtype)
        if dtype != torch.float32:
            # Quantized weights keep their codes through .to() (their compute
            # dtype becomes `dtype`); everything else is cast.
            part.to(dtype=dtype)


@torch.no_grad()
def quantize_layers(model: nn.Module, base_precision: str, compute_dtype: torch.dtype,
                    device: torch.device) -> int:
    """Replace every Linear/Conv2d weight of `model` by a `QuantizedWeight`;
    the number of layers quantized."""
    count = 0
    for module in model.modules():
        if type(module) not in (nn.Linear, nn.Conv2d) or isinstance(
                module.weight, QuantizedWeight):
            continue
        weight = module.weight.detach().to(device)
        use_nf4 = base_precision == "nf4" and type(module) is nn.Linear
        codec = Nf4Codec.quantize(weight.to(compute_dtype)) if use_nf4 else Fp8Codec.quantize(
            weight)
        module.weight = nn.Parameter(QuantizedWeight(codec, compute_dtype), requires_grad=False)
        count += 1
    return count


def quantized_weights(model: nn.Module) -> list[QuantizedWeight]:
    return [p for p in model.parameters() if isinstance(p, QuantizedWeight)]


def stored_dtype(tensor: torch.Tensor) -> torch.dtype:
    return tensor.stored_dtype if isinstance(tensor, QuantizedWeight) else tensor.dtype


def stored_bytes(tensor: torch.Tensor) -> int:
    if isinstance(tensor, QuantizedWeight):
        return tensor.stored_bytes()
    return tensor.numel() * tensor.element_size()


def storage_summary(model: nn.Module) -> dict[str, int]:
    """Parameters per stored dtype ("torch.float8_e4m3fn": n, ...), for the run plan."""
    counts: dict[str, int] = {}
    for param in model.parameters():
        key = str(stored_dtype(param))
        counts[key] = counts.get(key, 0) + param.numel()
    return dict(sorted(counts.items()))


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every stored parameter and buffer (quantized ones as stored)."""
    return sum(stored_bytes(t) for t in (*model.parameters(), *model.buffers()))

