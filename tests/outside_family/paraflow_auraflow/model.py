"""A tiny AuraFlow pipeline built from config with a fixed init seed (UMT5 text encoder, an
in-memory word tokenizer: nothing downloads), and its config `model=tiny_auraflow_random`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import (
    AuraFlowPipeline,
    AuraFlowTransformer2DModel,
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
)
from transformers import UMT5Config, UMT5EncoderModel

from paraflow.models.tokenizer import DEFAULT_VOCABULARY, build_word_tokenizer


def build_tiny_auraflow(transformer: dict[str, Any], vae: dict[str, Any],
                        text_encoder: dict[str, Any], init_seed: int = 0,
                        max_tokens: int = 16) -> AuraFlowPipeline:
    tokenizer = build_word_tokenizer(list(DEFAULT_VOCABULARY), max_tokens, t5=True)
    torch.manual_seed(init_seed)
    encoder = UMT5EncoderModel(UMT5Config(**{"vocab_size": len(tokenizer), **text_encoder,
                                             "pad_token_id": 0, "eos_token_id": 1,
                                             "decoder_start_token_id": 0})).eval()
    return AuraFlowPipeline(
        tokenizer=tokenizer, text_encoder=encoder, vae=AutoencoderKL(**vae),
        transformer=AuraFlowTransformer2DModel.from_config(transformer),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.73))


TRANSFORMER = {
    "_class_name": "AuraFlowTransformer2DModel",  # how paraflow finds the family before loading
    "sample_size": 8, "patch_size": 2, "in_channels": 4, "out_channels": 4,
    "num_mmdit_layers": 1, "num_single_dit_layers": 1, "attention_head_dim": 8,
    "num_attention_heads": 4, "joint_attention_dim": 32, "caption_projection_dim": 32,
    "pos_embed_max_size": 256,
}
VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4,
       "block_out_channels": [16, 32, 32, 32],
       "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
       "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 64, "scaling_factor": 0.13025}
UMT5 = {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4,
        "feed_forward_proj": "gated-gelu"}


@dataclass
class TinyAuraFlowConfig:
    _target_: str = "paraflow_auraflow.model.build_tiny_auraflow"
    name: str = "tiny_auraflow_random"
    init_seed: int = 0
    max_tokens: int = 16
    transformer: dict[str, Any] = field(default_factory=lambda: dict(TRANSFORMER))
    vae: dict[str, Any] = field(default_factory=lambda: dict(VAE))
    text_encoder: dict[str, Any] = field(default_factory=lambda: dict(UMT5))
    lora: list[Any] = field(default_factory=list)
    lora_fuse: bool = False


def register(store: Any) -> None:
    store.store(group="model", name="tiny_auraflow_random", node=TinyAuraFlowConfig)
