"""Inputs and runners shared by the adapter tests: one fixed batch through the
demo model's text encoder and U-Net."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from networks.network import AdapterNetwork, NetworkSpec

# The adapter cases every route is checked on.
NETWORK_CASES = {
    "lora": NetworkSpec("lora", rank=4, alpha=2),
    "locon": NetworkSpec("locon", rank=4, alpha=2, conv_rank=4, conv_alpha=1),
    "locon-tucker": NetworkSpec("locon", rank=4, alpha=2, conv_rank=4, conv_alpha=1, tucker=True),
    "loha": NetworkSpec("loha", rank=4, alpha=2, conv_rank=4, conv_alpha=1),
    "loha-tucker": NetworkSpec("loha", rank=4, alpha=2, conv_rank=4, conv_alpha=1, tucker=True),
    # rank 2: low enough for the demo model's small w1 factors to be factorised too
    "lokr": NetworkSpec("lokr", rank=2, alpha=2, conv_rank=2, conv_alpha=1,
                        options={"decompose_both": True}),
}


@dataclass
class Outputs:
    text: torch.Tensor
    noise: torch.Tensor


def fixed_inputs(sd, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = sd.tokenizer(
        "a photo of a cat, best quality", padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    latents = torch.randn(2, 4, 16, 16, generator=generator)
    return {"ids": ids.repeat(2, 1), "latents": latents, "timesteps": torch.tensor([10, 700])}


@torch.no_grad()
def run(text_encoder, unet, inputs) -> Outputs:
    text = text_encoder(inputs["ids"]).last_hidden_state
    noise = unet(inputs["latents"], inputs["timesteps"], text).sample
    return Outputs(text, noise)


@torch.no_grad()
def randomize(network: AdapterNetwork, seed: int = 1, std: float = 0.1) -> None:
    """Non-zero adapter weights, so that every route has a delta to agree on."""
    generator = torch.Generator().manual_seed(seed)
    for param in network.parameters():
        param.copy_(torch.randn(param.shape, generator=generator) * std)


def assert_outputs_close(actual: Outputs, expected: Outputs, rtol=1e-5, atol=1e-5) -> None:
    torch.testing.assert_close(actual.text, expected.text, rtol=rtol, atol=atol)
    torch.testing.assert_close(actual.noise, expected.noise, rtol=rtol, atol=atol)


def file_deltas(path, sd) -> dict[str, torch.Tensor]:
    """Each module's scaled delta in an adapter file, as the real loader applies it."""
    from networks.export import load_network

    network = load_network(path, sd.unet, sd.text_encoder)
    return {a.lora_name: a.scaled_delta().float() for a in network.adapters}
