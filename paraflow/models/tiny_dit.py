"""Diffusion-transformer pipelines built from config with a fixed init seed: PixArt-α and
PixArt-Σ (a PixArtTransformer2DModel, a T5 encoder, the SD/SDXL VAE), at toy widths for CI or
at the published shapes for the planner. Tokenizers are built in memory: nothing downloads."""

from __future__ import annotations

from typing import Any, Literal

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
)
from transformers import T5Config, T5EncoderModel

from paraflow.models.tokenizer import DEFAULT_VOCABULARY, build_word_tokenizer

# PixArt's training schedule (linear betas); `scheduler=` overrides swap the class, keep these.
PIXART_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 0,
}
PIPELINES = {"pixart_alpha": PixArtAlphaPipeline, "pixart_sigma": PixArtSigmaPipeline}


def build_tiny_dit(
    arch: Literal["pixart_alpha", "pixart_sigma"],
    transformer: dict[str, Any],
    vae: dict[str, Any],
    text_encoder: dict[str, Any],
    init_seed: int = 0,
    max_tokens: int = 16,
    vocabulary: list[str] | None = None,
) -> Any:
    """A randomly initialised PixArt pipeline; `text_encoder` is a T5Config (its vocabulary is
    the word tokenizer's unless the config names a size, as the full-size architectures do)."""
    tokenizer = build_word_tokenizer(list(vocabulary or DEFAULT_VOCABULARY), max_tokens, t5=True)
    torch.manual_seed(init_seed)
    encoder = T5EncoderModel(T5Config(**{"vocab_size": len(tokenizer), **text_encoder,
                                         "pad_token_id": 0, "eos_token_id": 1,
                                         "decoder_start_token_id": 0})).eval()  # no dropout
    return PIPELINES[arch](
        tokenizer=tokenizer,
        text_encoder=encoder,
        vae=AutoencoderKL(**vae),
        transformer=PixArtTransformer2DModel(**transformer),
        scheduler=DDIMScheduler(**PIXART_SCHEDULER_CONFIG),
    )
