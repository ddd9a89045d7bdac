"""The one place that knows diffusers' internal names: prompt encoding, micro-conditioning,
latent scaling and image post-processing for SD 1.x/2.x and SDXL pipelines."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.image_processor import VaeImageProcessor


@dataclass
class Conditioning:
    """What the denoiser is conditioned on, batch ordered [unconditional..., conditional...]
    when guidance is on (as diffusers orders it)."""

    embeds: torch.Tensor
    added: dict[str, torch.Tensor] | None  # SDXL: pooled text embeds and time ids

    def to(self, device: torch.device, dtype: torch.dtype) -> Conditioning:
        added = {k: v.to(device=device, dtype=dtype) for k, v in (self.added or {}).items()}
        return Conditioning(self.embeds.to(device=device, dtype=dtype), added or None)


def is_sdxl(pipe: Any) -> bool:
    return isinstance(pipe, StableDiffusionXLPipeline)


def vae_scale_factor(pipe: Any) -> int:
    return int(2 ** (len(pipe.vae.config.block_out_channels) - 1))


def uses_guidance(pipe: Any, guidance_scale: float) -> bool:
    """Classifier-free guidance runs when the scale exceeds 1, as in diffusers."""
    return guidance_scale > 1.0 and pipe.unet.config.time_cond_proj_dim is None


def encode_prompts(
    pipe: Any,
    prompts: list[str],
    negative_prompt: str | None,
    device: torch.device,
    guidance: bool,
    height: int,
    width: int,
) -> Conditioning:
    """Encode one prompt per image with the pipeline's own `encode_prompt`."""
    negative = None if negative_prompt is None else [negative_prompt] * len(prompts)
    if not is_sdxl(pipe):
        cond, uncond = pipe.encode_prompt(prompts, device, 1, guidance, negative_prompt=negative)
        embeds = torch.cat([uncond, cond]) if guidance else cond
        return Conditioning(embeds, None)
    cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
        prompts, device=device, num_images_per_prompt=1,
        do_classifier_free_guidance=guidance, negative_prompt=negative,
    )
    # Micro-conditioning: original size, crop offset, target size (no crop, no resize).
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=device)
    time_ids = time_ids.to(cond.dtype).repeat(len(prompts), 1)
    if guidance:
        return Conditioning(
            torch.cat([uncond, cond]),
            {"text_embeds": torch.cat([uncond_pooled, pooled]), "time_ids": time_ids.repeat(2, 1)},
        )
    return Conditioning(cond, {"text_embeds": pooled, "time_ids": time_ids})


def denoiser_forward(
    unet: torch.nn.Module, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning
) -> torch.Tensor:
    out = unet(latents, t, encoder_hidden_states=cond.embeds,
               added_cond_kwargs=cond.added, return_dict=False)
    return out[0]


def latents_to_vae_input(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Undo the latent normalisation the VAE was trained with (mean/std where given)."""
    config = vae.config
    mean = getattr(config, "latents_mean", None)
    std = getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        shape = (1, latents.shape[1], 1, 1)
        mean_t = torch.tensor(mean, device=latents.device, dtype=latents.dtype).view(shape)
        std_t = torch.tensor(std, device=latents.device, dtype=latents.dtype).view(shape)
        return latents * std_t / config.scaling_factor + mean_t
    return latents / config.scaling_factor


def pixels_to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW pixels to uint8 NHWC, rounded as diffusers rounds when it makes PIL images."""
    images = VaeImageProcessor().postprocess(pixels.float(), output_type="np")
    return (images * 255).round().astype(np.uint8)


def unknown_words(tokenizer: Any, texts: list[str]) -> list[str]:
    """The words of `texts` that `tokenizer` maps to its unknown token, in first-seen order."""
    unk = tokenizer.unk_token_id
    if unk is None:
        return []
    words = dict.fromkeys(w for text in texts for w in re.findall(r"[\w']+", text.lower()))
    return [w for w in words if unk in tokenizer(w, add_special_tokens=False).input_ids]
