"""PixArt-α and PixArt-Σ: a patch-embedding transformer over T5 text (with its attention mask);
PixArt-α also reads the image's resolution and aspect ratio. The transformer predicts the
variance too (twice the latent channels), which the pipelines drop."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers.image_processor import PixArtImageProcessor
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (
    ASPECT_RATIO_256_BIN,
    ASPECT_RATIO_512_BIN,
    ASPECT_RATIO_1024_BIN,
)
from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN
from torch import nn

from paraflow.families.base import BaseFamily, Conditioning
from paraflow.families.patched import band_patch_embed, patch_embed_of, t5_tokens

_BLOCKS = "transformer_blocks.*"


class PixArtFamily(BaseFamily):
    name = "pixart"
    denoisers = ("PixArtTransformer2DModel",)
    takes_lora = False  # PixArt's pipelines load no LoRA
    tensor_plan = {
        "adaln_single.linear": "colwise_gather",
        f"{_BLOCKS}.attn[12].to_[qkv]": "colwise", f"{_BLOCKS}.attn[12].to_out.0": "rowwise",
        f"{_BLOCKS}.attn[12]": "heads",
        f"{_BLOCKS}.ff.net.0.proj": "colwise", f"{_BLOCKS}.ff.net.2": "rowwise",
    }

    def latent_channels(self, config: Mapping[str, Any]) -> int:
        return int(config["in_channels"])

    def context_width(self, config: Mapping[str, Any]) -> int:
        return int(config["caption_channels"])

    def conditioning_extras(self, config: Mapping[str, Any],
                            tokens: int) -> dict[str, tuple[int, ...]] | None:
        extras: dict[str, tuple[int, ...]] = {"encoder_attention_mask": (tokens,)}
        if config.get("use_additional_conditions"):
            extras.update(resolution=(2,), aspect_ratio=(1,))
        return extras

    def prompt_tokenizers(self) -> tuple[tuple[str, bool], ...]:
        return (("tokenizer", True),)

    def encode_prompts(self, pipe: Any, prompts: list[str], negative_prompt: str | None,
                       device: torch.device, guidance: bool, height: int, width: int,
                       clip_skip: int | None = None, micro: Any = None) -> Conditioning:
        """T5 embeddings and their mask as PixArt's `encode_prompt` makes them (captions not
        cleaned; the pipeline's token limit, or the tokenizer's if shorter)."""
        cond, mask, uncond, uncond_mask = pipe.encode_prompt(
            prompts, do_classifier_free_guidance=guidance,
            negative_prompt=negative_prompt or "", device=device, clean_caption=False,
            max_sequence_length=t5_tokens(pipe, pipe.tokenizer))
        added = {"encoder_attention_mask": mask}
        if pipe.transformer.config.get("use_additional_conditions"):
            added["resolution"] = torch.tensor([[height, width]], dtype=cond.dtype,
                                               device=device).repeat(len(prompts), 1)
            added["aspect_ratio"] = torch.tensor([[height / width]], dtype=cond.dtype,
                                                 device=device).repeat(len(prompts), 1)
        if not guidance:
            return Conditioning(cond, added)
        negative = {**added, "encoder_attention_mask": uncond_mask}
        return Conditioning(torch.cat([uncond, cond]),
                            {k: torch.cat([negative[k], v]) for k, v in added.items()})

    def forward(self, model: nn.Module, latents: torch.Tensor, timestep: torch.Tensor,
                cond: Conditioning, first_row: int = 0) -> torch.Tensor:
        added = cond.added or {}
        if timestep.dim() == 0:
            timestep = timestep.reshape(1).expand(latents.shape[0])
        noise: torch.Tensor = model(
            latents, encoder_hidden_states=cond.embeds,
            encoder_attention_mask=added.get("encoder_attention_mask"), timestep=timestep,
            added_cond_kwargs={"resolution": added.get("resolution"),
                               "aspect_ratio": added.get("aspect_ratio")},
            return_dict=False)[0]
        config: Any = model.config
        if config.out_channels // 2 == config.in_channels:  # learned variance: dropped
            noise = noise.chunk(2, dim=1)[0]
        return noise

    def resolution_bins(self, config: Mapping[str, Any]) -> dict[str, list[float]] | None:
        """The pipelines' bins (use_resolution_binning) for the transformer's sample size;
        None for a sample size they have none for (the stock pipelines refuse those)."""
        bins: dict[int, dict[str, list[float]]] = {256: ASPECT_RATIO_2048_BIN,
                                                   128: ASPECT_RATIO_1024_BIN,
                                                   64: ASPECT_RATIO_512_BIN,
                                                   32: ASPECT_RATIO_256_BIN}
        return bins.get(int(config.get("sample_size") or 0))

    def resize_from_bin(self, pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return PixArtImageProcessor.resize_and_crop_tensor(pixels, width, height)

    def patch_embedding(self, model: nn.Module) -> nn.Module | None:
        return patch_embed_of(model)

    def band_patch_embed(self, embed: nn.Module, band: torch.Tensor, rows: int,
                         first_row: int) -> torch.Tensor:
        return band_patch_embed(embed, band, rows, first_row)
