"""Captions -> U-Net conditioning, with clip skip."""

from __future__ import annotations

import torch


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def encode_captions(
    text_encoder, tokenizer, captions: list[str], clip_skip: int = 1
) -> torch.Tensor:
    """The text encoder's last hidden state, or with clip_skip = n the output of
    the n-th layer from the end passed through the final layer norm, as A1111
    and kohya do ("CLIP skip 2" for anime models)."""
    ids = tokenize(tokenizer, captions).to(text_encoder.device)
    if clip_skip <= 1:
        return text_encoder(ids).last_hidden_state
    hidden = text_encoder(ids, output_hidden_states=True).hidden_states[-clip_skip]
    return final_layer_norm(text_encoder)(hidden)


def final_layer_norm(text_encoder) -> torch.nn.Module:
    # transformers >= 5.6 flattened CLIPTextModel; older ones nest it in text_model.
    inner = getattr(text_encoder, "text_model", text_encoder)
    return inner.final_layer_norm
