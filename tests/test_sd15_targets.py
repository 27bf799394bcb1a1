"""Target sets and key names on the real SD1.5 architecture
(docs/FORMATS.md "Targeted modules"), built on the meta device: the
structure is real, no weights are allocated."""

from __future__ import annotations

import pytest

from networks.network import AdapterNetwork, NetworkSpec
from trainer.sd15_config import build_sd15_from_config


@pytest.fixture(scope="module")
def sd15():
    return build_sd15_from_config(device="meta")


def names(network: AdapterNetwork) -> set[str]:
    return {a.lora_name for a in network.adapters}


def test_lora_targets_192_unet_and_72_text_encoder_modules(sd15):
    network = AdapterNetwork.create(NetworkSpec("lora"), sd15.unet, sd15.text_encoder)
    assert len(network.unet_adapters) == 192
    assert len(network.text_encoder_adapters) == 72
    assert {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_mid_block_attentions_0_proj_in",
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0",
        "lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_ff_net_0_proj",
        "lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_ff_net_2",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te_text_model_encoder_layers_11_self_attn_out_proj",
        "lora_te_text_model_encoder_layers_5_mlp_fc1",
        "lora_te_text_model_encoder_layers_5_mlp_fc2",
    } <= names(network)
    per_layer = {n.split("_layers_")[1].split("_", 1)[1] for n in names(network) if "_te_" in n}
    assert per_layer == {
        "self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj",
        "mlp_fc1", "mlp_fc2",
    }  # fmt: skip


def test_locon_adds_exactly_the_conv_set(sd15):
    lora = AdapterNetwork.create(NetworkSpec("lora"), sd15.unet, sd15.text_encoder)
    locon = AdapterNetwork.create(NetworkSpec("locon"), sd15.unet, sd15.text_encoder)
    added = names(locon) - names(lora)
    # 22 resnets x (conv1, conv2, time_emb_proj), 14 with a conv_shortcut,
    # 3 downsamplers and 3 upsamplers.
    by_kind = {
        kind: sum(n.endswith(kind) for n in added)
        for kind in ("conv1", "conv2", "time_emb_proj", "conv_shortcut", "samplers_0_conv")
    }
    assert by_kind == {
        "conv1": 22, "conv2": 22, "time_emb_proj": 22, "conv_shortcut": 14, "samplers_0_conv": 6,
    }  # fmt: skip
    assert len(added) == sum(by_kind.values())
    assert {
        "lora_unet_down_blocks_0_resnets_0_conv1",
        "lora_unet_down_blocks_1_resnets_0_conv_shortcut",
        "lora_unet_down_blocks_0_downsamplers_0_conv",
        "lora_unet_up_blocks_0_upsamplers_0_conv",
        "lora_unet_mid_block_resnets_1_time_emb_proj",
    } <= added
    assert not any(
        "conv_in" in n or "conv_out" in n or "time_embedding" in n or "norm" in n for n in added
    )
    conv_3x3 = [a for a in locon.unet_adapters if a.lora_name.endswith(("conv1", "conv2"))]
    assert {a.rank for a in conv_3x3} == {NetworkSpec().conv_rank}
