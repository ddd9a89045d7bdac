"""Diffusion-transformer pipelines built from config with a fixed init seed: PixArt-α/Σ (a
PixArt transformer, a T5 encoder), Stable Diffusion 3 (an MMDiT, two CLIP encoders with
projections and T5) and Flux (MMDiT + single-stream blocks, one CLIP and T5), at toy widths for
CI or at the published shapes for the planner. Tokenizers are built in memory: nothing
downloads."""

from __future__ import annotations

from typing import Any, Literal

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from paraflow.models.tiny import text_encoder_config
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
# The flow-matching schedules SD3 and Flux ship with (Flux shifts by the image's token count).
SD3_SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0}
FLUX_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
    "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096,
}
PIXART = {"pixart_alpha": PixArtAlphaPipeline, "pixart_sigma": PixArtSigmaPipeline}
PIPELINES = {**PIXART, "sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}
TRANSFORMERS = {"pixart_alpha": PixArtTransformer2DModel, "pixart_sigma": PixArtTransformer2DModel,
                "sd3": SD3Transformer2DModel, "flux": FluxTransformer2DModel}


def _t5(tokenizer: Any, config: dict[str, Any]) -> T5EncoderModel:
    """A T5 encoder (in eval mode: no dropout) over the tokenizer's vocabulary unless the config
    names a size, as the full-size architectures do."""
    return T5EncoderModel(T5Config(**{"vocab_size": len(tokenizer), **config, "pad_token_id": 0,
                                      "eos_token_id": 1, "decoder_start_token_id": 0})).eval()


def build_tiny_dit(
    arch: Literal["pixart_alpha", "pixart_sigma", "sd3", "flux"],
    transformer: dict[str, Any],
    vae: dict[str, Any],
    text_encoder: dict[str, Any],
    clip: dict[str, Any] | None = None,
    clip_2: dict[str, Any] | None = None,
    init_seed: int = 0,
    max_tokens: int = 16,
    vocabulary: list[str] | None = None,
    t5_tokens: int | None = None,
) -> Any:
    """A randomly initialised DiT pipeline. `text_encoder` is a T5Config; `clip` a CLIPTextConfig
    (SD3's first CLIP, Flux's only one), `clip_2` SD3's second CLIP (default: as `clip`).
    Tokenizers pad to `max_tokens`, T5's to `t5_tokens` if given."""
    words = list(vocabulary or DEFAULT_VOCABULARY)
    t5_tokenizer = build_word_tokenizer(words, t5_tokens or max_tokens, t5=True)
    torch.manual_seed(init_seed)
    t5 = _t5(t5_tokenizer, text_encoder)
    autoencoder = AutoencoderKL(**vae)
    if arch in PIXART:
        return PIXART[arch](tokenizer=t5_tokenizer, text_encoder=t5, vae=autoencoder,
                            transformer=TRANSFORMERS[arch](**transformer),
                            scheduler=DDIMScheduler(**PIXART_SCHEDULER_CONFIG))
    clip_tokenizer = build_word_tokenizer(words, max_tokens)
    if arch == "flux":
        return FluxPipeline(
            tokenizer=clip_tokenizer, text_encoder=CLIPTextModel(
                text_encoder_config(clip_tokenizer, clip or {})).eval(),
            tokenizer_2=t5_tokenizer, text_encoder_2=t5, vae=autoencoder,
            transformer=TRANSFORMERS[arch](**transformer),
            scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG))
    clips = [CLIPTextModelWithProjection(text_encoder_config(clip_tokenizer, c or {})).eval()
             for c in (clip, clip_2 or clip)]
    return StableDiffusion3Pipeline(
        tokenizer=clip_tokenizer, text_encoder=clips[0],
        tokenizer_2=build_word_tokenizer(words, max_tokens), text_encoder_2=clips[1],
        tokenizer_3=t5_tokenizer, text_encoder_3=t5, vae=autoencoder,
        transformer=TRANSFORMERS[arch](**transformer),
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG))
