"""Frozen layer weights stored quantized: fp8 (float8_e4m3fn, a scale per
output channel) and nf4 (bitsandbytes, CUDA), upcast per layer at compute.

Why a tensor subclass in the layer's own `weight` slot, not a module swap or
`torch.nn.utils.parametrize`: the adapters (networks/base.py) attach to
exactly `nn.Linear` / `nn.Conv2d` (`type(base)` is looked up, so the
`ParametrizedLinear` class that parametrize injects, or bitsandbytes'
`Linear4bit`, would be refused), and they read `base.weight` for DoRA norms,
shapes and the LoKr/LoHa routes. A `QuantizedWeight` keeps the module's class
and state-dict names (`conv_in.weight`) and reads as the dequantized weight
to every tensor operation (`.float()`, `.reshape`, `+`), so that code runs
untouched. `F.linear` / `F.conv2d` on it (the layer's own forward, and DoRA's
`apply_weight`) go through autograd functions that keep only the quantized
weight for the backward pass and rebuild the full-size one per layer: a
parametrization would hand each layer a dequantized tensor that autograd then
saves until the backward pass, which costs more memory than not quantizing.
The weight never requires a gradient: gradients reach the adapters through the
layer's input, never its weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
aten = torch.ops.aten


class Fp8Codec:
    """float8_e4m3fn codes with one fp32 scale per output channel (amax / 448)."""

    kind = "fp8"

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor):
        self.codes, self.scale = codes, scale

    @classmethod
    @torch.no_grad()
    def quantize(cls, weight: torch.Tensor) -> Fp8Codec:
        w = weight.float()
        amax = w.abs().flatten(1).amax(dim=1).view(-1, *[1] * (w.dim() - 1))
        # An all-zero channel keeps scale 1 (its codes are 0 either way).
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        codes = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        return cls(codes, scale)

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        # In place on the fresh upcast copy: one full-size temporary, not two
        # (torch has no fp8 x fp32 promotion to fuse the two into one kernel).
        return self.codes.to(dtype).mul_(self.scale.to(dtype))

    def to(self, device) -> Fp8Codec:
        return Fp8Codec(self.codes.to(device), self.scale.to(device))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.codes, self.scale)

    def flatten(self) -> tuple[dict[str, torch.Tensor], object]:
        return {"codes": self.codes, "scale": self.scale}, None

    @classmethod
    def unflatten(cls, inner: dict[str, torch.Tensor], context) -> Fp8Codec:
        return cls(inner["codes"], inner["scale"])


class Nf4Codec:
    """bitsandbytes 4-bit NormalFloat, blocks of 64 with double-quantized
    absmax (the QLoRA defaults); CUDA only. Unmeasured here (no GPU)."""

    kind = "nf4"

    def __init__(self, packed: torch.Tensor, state, shape: torch.Size):
        self.packed, self.state, self._shape = packed, state, shape

    @classmethod
    @torch.no_grad()
    def quantize(cls, weight: torch.Tensor) -> Nf4Codec:
        import bitsandbytes.functional as bnb_f

        packed, state = bnb_f.quantize_4bit(
            weight.contiguous(), blocksize=64, quant_type="nf4", compress_statistics=True
        )
        return cls(packed, state, weight.shape)

    @property
    def shape(self) -> torch.Size:
        return self._shape

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        import bitsandbytes.functional as bnb_f

        return bnb_f.dequantize_4bit(self.packed, self.state).view(self._shape).to(dtype)

    def to(self, device) -> Nf4Codec:
        if torch.device(device) != self.device:
            raise RuntimeError("an nf4 weight is quantized on its GPU and cannot move")
        return self

    def flatten(self) -> tuple[dict[str, torch.Tensor], object]:
        return {"packed": self.packed}, (self.state, self._shape)

    @classmethod
    def unflatten(cls, inner: dict[str, torch.Tensor], context) -> Nf4Codec:
        return cls(inner["packed"], *context)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        state = self.state
        extra = [t for t in (state.absmax, state.code, getattr(state.state2, "absmax", None),
                             getattr(state.state2, "code", None)) if t is not None]
        return (self.packed, *extra)


class QuantizedWeight(torch.Tensor):
    """A frozen weight held by `codec`, reporting the compute dtype as its
    dtype: every operation but the layer ops sees the dequantized tensor."""

    codec: Fp8Codec | Nf4Codec

    @staticmethod
    def __new__(cls, codec, dtype: torch.dtype):
        return torch.Tensor._make_wrapper_subclass(
            cls, codec.shape, dtype=dtype, device=codec.device, requires_grad=False
        )

    def __init__(self, codec, dtype: torch.dtype):
        self.codec = codec
        for name, tensor in codec.flatten()[0].items():  # named for __tensor_flatten__
            setattr(self, name, tensor)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.codec.dequantize(dtype or self.dtype)

    @property
    def stored_dtype(self) -> torch.dtype:
        return FP8 if self.codec.kind == "fp8" else torch.uint8

    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.codec.tensors())

    def __repr__(self, *, tensor_contents=None) -> str:
        return (f"QuantizedWeight({self.codec.kind}, shape={tuple(self.shape)}, "
                f"compute={self.dtype}, device={self.device})")

    # The traceable-subclass protocol: nn.Module.to() then swaps in the moved
    # weight (torch.utils.swap_tensors) instead of overwriting its metadata.
    def __tensor_flatten__(self):
        inner, context = self.codec.flatten()
        return list(inner), (type(self.codec), context, self.dtype)

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        codec_type, context, dtype = meta
        return QuantizedWeight(codec_type.unflatten(dict(inner), context), dtype)

    def __deepcopy__(self, memo):
        # A copy of the codes (copy.deepcopy(sd) in tests), not of a dequantized tensor.
        import copy

        twin = QuantizedWeight(copy.deepcopy(self.codec, memo), self.dtype)
        return torch.nn.Parameter(twin, requires_grad=False) if isinstance(
            self, torch.nn.Parameter) else twin

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and _is_quantized(args, kwargs, 1, "weight"):
            return _linear(*args, **kwargs)
        if func is F.conv2d and _is_quantized(args, kwargs, 1, "weight"):
            return _conv2d(*args, **kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self = args[0] if args and isinstance(args[0], QuantizedWeight) else None
        if func is aten.detach.default and self is not None:
            return QuantizedWeight(self.codec, self.dtype)
        if func is aten._to_copy.default and self is not None:
            # module.to(device or dtype) keeps the codes: a move, or another compute dtype.
            dtype = kwargs.get("dtype") or self.dtype
            return QuantizedWeight(self.codec.to(kwargs.get("device") or self.device), dtype)
        if func._schema.is_mutable and any(isinstance(a, QuantizedWeight) for a in args):
            # Writing into the dequantized copy would be silently lost.
            raise RuntimeError(
                f"{func.__name__} would change a quantized frozen weight (model.base_precision "
                '"fp8"/"nf4"), which cannot be written to: merge adapters into a model '
                "loaded in full precision instead"
            )
        return func(*tree_map(_plain, args), **tree_map(_plain, kwargs))


def _plain(value):
    return value.dequantize() if isinstance(value, QuantizedWeight) else value


def _is_quantized(args, kwargs, index: int, name: str) -> bool:
    value = args[index] if len(args) > index else kwargs.get(name)
    return isinstance(value, QuantizedWeight)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


class _QuantizedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        dtype = _compute_dtype(x)
        ctx.weight, ctx.has_bias = weight, bias is not None
        ctx.x_dtype = x.dtype
        return F.linear(x.to(dtype), weight.dequantize(dtype), _cast(bias, dtype))

    @staticmethod
    def backward(ctx, grad):
        grad_x = grad @ ctx.weight.dequantize(grad.dtype) if ctx.needs_input_grad[0] else None
        grad_bias = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.flatten(0, -2).sum(0)
        return _cast(grad_x, ctx.x_dtype), None, grad_bias


def _linear(x, weight, bias=None):
    return _QuantizedLinear.apply(x, weight, bias)


class _QuantizedConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        dtype = _compute_dtype(x)
        ctx.weight, ctx.has_bias, ctx.x_dtype = weight, bias is not None, x.dtype
        ctx.conv = (x.shape, stride, padding, dilation, groups)
        return F.conv2d(x.to(dtype), weight.dequantize(dtype), _cast(bias, dtype), stride,
                        padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        shape, stride, padding, dilation, groups = ctx.conv
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = ctx.weight.dequantize(grad.dtype)
            grad_x = torch.nn.grad.conv2d_input(shape, weight, grad, stride, padding, dilation,
                                                groups).to(ctx.x_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum((0, 2, 3))
        return grad_x, None, grad_bias, None, None, None, None


def _conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    if isinstance(padding, str):  # "same"/"valid": the generic route, dequantized
        return F.conv2d(x, weight.dequantize(_compute_dtype(x)), bias, stride, padding,
                        dilation, groups)
    return _QuantizedConv2d.apply(x, weight, bias, stride, padding, dilation, groups)
