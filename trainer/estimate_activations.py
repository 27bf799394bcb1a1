"""Activation memory of a training step, measured by construction on the meta device.

The models are built on the meta device (shapes only, no storage), the
adapters attached, and one step run under `LiveBytes`, a dispatch mode that
adds up the bytes of every tensor the step's operations create and takes
them off again when the tensor is freed: its peak is what the step needs
besides the weights, forward and backward, saved tensors and temporaries
alike, with gradient checkpointing's recomputation included when it is on.
Nothing is allocated; SD1.5 takes about a second.

What the meta device does differently from the real run, and how it is made
to match (checked against real CPU tensors with the same mode:
bench/memory_estimate.py):
- `scaled_dot_product_attention` on meta takes its math kernel, which keeps
  the whole attention matrix; CPU and CUDA take a fused kernel that keeps
  q, k, v, the output and a log-sum-exp per row. `fused_attention` routes the
  calls to the fused CPU kernel's meta implementation.
- Autocast does not apply to meta tensors, so the step runs with the weights
  and inputs in the compute dtype instead: the ops autocast keeps in fp32
  (norms, softmax) are counted at the compute dtype's size.
Memory that kernels allocate internally (oneDNN scratch, cuBLAS workspaces)
is not seen; trainer/estimate.py adds the measured allowances.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

META = torch.device("meta")
TOKENS = 77  # CLIP's context length: every caption is padded to it


class LiveBytes(TorchDispatchMode):
    """Bytes held by the tensors created under this mode, now and at the peak.
    Counted per storage, freed by a weak reference (a storage's Python object
    lives as long as the storage does). An output sharing an input's storage
    is a view: counted with that input, or not at all when the input existed
    before (a weight, transposed for a matmul)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._refs: set[weakref.ref] = set()

    def _freed(self, size: int, ref: weakref.ref) -> None:
        self.live -= size
        self._refs.discard(ref)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                if storage in self._seen or storage._cdata in inputs:
                    continue
                size = storage.nbytes()
                self._seen[storage] = size
                self._refs.add(weakref.ref(storage, lambda ref, n=size: self._freed(n, ref)))
                self.live += size
                self.peak = max(self.peak, self.live)
        return out

    def reset_peak(self) -> None:
        self.peak = self.live


def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                enable_gqa=False):
    out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)
    return out


@contextlib.contextmanager
def fused_attention() -> Iterator[None]:
    """`F.scaled_dot_product_attention` as the fused kernel while tracing.
    A module attribute, not a torch-function mode: gradient checkpointing
    recomputes in the autograd engine's thread, which such a mode misses."""
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _fused_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


@dataclass(frozen=True)
class StepShape:
    batch: int
    height: int  # pixels
    width: int
    dtype: torch.dtype  # the compute dtype
    checkpointing: bool
    train_text_encoder: bool
    clip_skip: int = 1


@dataclass(frozen=True)
class StepBytes:
    text_encoder: int  # the text encoder's activations kept for the backward pass
    step_peak: int  # the whole step's peak above the weights, forward and backward
    vae_encode: int  # the VAE encoding one batch (no gradients), at its peak; 0: not traced


def build_meta_models(unet_config: dict, text_config: dict, vae_config: dict):
    """(unet, text_encoder, vae) on the meta device, frozen."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with META:
        unet = UNet2DConditionModel.from_config(unet_config)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
        vae = AutoencoderKL.from_config(vae_config)
    for model in (unet, text_encoder, vae):
        model.requires_grad_(False)
    return unet, text_encoder, vae


def attach_meta_network(spec, unet, text_encoder, dtype: torch.dtype):
    """The adapters the run would attach, on meta, in the compute dtype (under
    autocast their matmuls run in it). Their alpha buffers are real tensors:
    the scale is read back as a float, which a meta tensor cannot give."""
    from networks.network import AdapterNetwork

    network = AdapterNetwork.create(spec, unet, text_encoder)
    network.to(dtype)
    for module in network.modules():
        if isinstance(getattr(module, "alpha", None), torch.Tensor):
            module.alpha = torch.ones((), dtype=dtype)
    return network.attach()


def measure_step(unet, text_encoder, vae, shape: StepShape, encode_pixels: bool = True
                 ) -> StepBytes:
    """One training step's activation bytes (models from `build_meta_models`,
    adapters attached; they are put in train mode and cast to the dtype).
    `encode_pixels`: also trace the VAE encoding a batch (latents not cached)."""
    for model in (unet, text_encoder):
        if model.dtype != shape.dtype:  # diffusers warns about any cast, even to fp32
            model.to(shape.dtype)
    unet.train()
    text_encoder.train(shape.train_text_encoder)
    if shape.checkpointing:
        unet.enable_gradient_checkpointing()
        if shape.train_text_encoder:
            text_encoder.gradient_checkpointing_enable()
    latent = (shape.batch, unet.config.in_channels, shape.height // 8, shape.width // 8)
    with fused_attention():
        vae_bytes = _vae_encode_peak(vae, shape) if encode_pixels else 0
        live = LiveBytes()
        with live:
            if shape.train_text_encoder:
                ids = torch.zeros((shape.batch, TOKENS), dtype=torch.long, device=META)
                text = _encode(text_encoder, ids, shape.clip_skip)
            else:  # a frozen encoder's embeddings come from a cache, or without gradients
                width = text_encoder.config.hidden_size
                text = torch.zeros((shape.batch, TOKENS, width), dtype=shape.dtype, device=META)
            text_bytes = live.live if shape.train_text_encoder else 0
            noisy = torch.zeros(latent, dtype=shape.dtype, device=META)
            timesteps = torch.zeros((shape.batch,), dtype=torch.long, device=META)
            prediction = unet(noisy, timesteps, text).sample
            target = torch.zeros(latent, device=META)
            loss = (prediction.float() - target).square().mean()
            loss.backward()
    return StepBytes(text_bytes, live.peak, vae_bytes)


def _encode(text_encoder, ids, clip_skip: int):
    from trainer.text_encoding import final_layer_norm

    if clip_skip <= 1:
        return text_encoder(ids).last_hidden_state
    hidden = text_encoder(ids, output_hidden_states=True).hidden_states[-clip_skip]
    return final_layer_norm(text_encoder)(hidden)


@torch.no_grad()
def _vae_encode_peak(vae, shape: StepShape) -> int:
    """The VAE (fp32, as the run keeps it) encoding one batch of pixels."""
    vae.float().eval()
    live = LiveBytes()
    with live:
        pixels = torch.zeros((shape.batch, 3, shape.height, shape.width), device=META)
        vae.encode(pixels).latent_dist.mode()
    return live.peak
