"""Small Stable-Diffusion-architecture models built from config, with a fixed init seed.

They have the real diffusers classes (UNet2DConditionModel, AutoencoderKL, CLIP text encoders)
at toy widths, so every code path of a full model runs offline in seconds.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from paraflow.models.tokenizer import DEFAULT_VOCABULARY, build_word_tokenizer

# The scheduler Stable Diffusion ships with; `scheduler=` overrides swap the class, keep these.
SD_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


DENOISER = UNet2DConditionModel  # what build_tiny denoises with

def text_encoder_config(tokenizer: Any, text_encoder: dict[str, Any]) -> CLIPTextConfig:
    """The tokenizer's sizes unless the config names others (a full-size architecture keeps
    CLIP's 49408-token embedding and 77 positions, so its parameter count is the real one)."""
    defaults = {"vocab_size": len(tokenizer),
                "max_position_embeddings": tokenizer.model_max_length}
    return CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{**defaults, **text_encoder},
    )


def build_tiny(
    arch: Literal["sd", "sdxl", "sdxl_refiner"],
    unet: dict[str, Any],
    vae: dict[str, Any],
    text_encoder: dict[str, Any],
    init_seed: int = 0,
    max_tokens: int = 16,
    vocabulary: list[str] | None = None,
    text_encoder_2: dict[str, Any] | None = None,
) -> Any:
    """Build a randomly initialised pipeline of architecture `arch`: "sd", "sdxl", or
    "sdxl_refiner" (SDXL's refiner: the second text encoder only, aesthetic-score time ids,
    as an img2img pipeline). `text_encoder_2` (SDXL's second encoder) defaults to
    `text_encoder`'s config."""
    words = list(vocabulary) if vocabulary else list(DEFAULT_VOCABULARY)
    tokenizer = build_word_tokenizer(words, max_length=max_tokens)
    scheduler = DDIMScheduler(**SD_SCHEDULER_CONFIG)
    torch.manual_seed(init_seed)
    unet_model = DENOISER(**unet)
    vae_model = AutoencoderKL(**vae)
    encoder = CLIPTextModel(text_encoder_config(tokenizer, text_encoder))
    if arch == "sd":
        return StableDiffusionPipeline(
            vae=vae_model,
            text_encoder=encoder,
            tokenizer=tokenizer,
            unet=unet_model,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    encoder_2 = CLIPTextModelWithProjection(
        text_encoder_config(tokenizer, text_encoder_2 or text_encoder))
    if arch == "sdxl_refiner":
        return StableDiffusionXLImg2ImgPipeline(
            vae=vae_model, text_encoder=None, text_encoder_2=encoder_2, tokenizer=None,
            tokenizer_2=build_word_tokenizer(words, max_length=max_tokens), unet=unet_model,
            scheduler=scheduler, requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False)
    return StableDiffusionXLPipeline(
        vae=vae_model,
        text_encoder=encoder,
        text_encoder_2=encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=build_word_tokenizer(words, max_length=max_tokens),
        unet=unet_model,
        scheduler=scheduler,
    )
