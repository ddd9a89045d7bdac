"""What the patch-embedding transformers (PixArt, SD3) share: diffusers' `PatchEmbed` (latent →
tokens plus a 2-D sine-cosine position), read for one band of rows; and the T5 prompt length the
T5-reading pipelines (PixArt, SD3, Flux) encode."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers.models.embeddings import PatchEmbed, get_2d_sincos_pos_embed
from torch import nn


def patch_embed_of(model: nn.Module) -> nn.Module | None:
    embed = getattr(model, "pos_embed", None)
    return embed if isinstance(embed, PatchEmbed) else None


def band_patch_embed(embed: Any, band: torch.Tensor, rows: int, first_row: int) -> torch.Tensor:
    """What `PatchEmbed` gives for latent rows [first_row, first_row + band rows) of an image
    `rows` latent rows tall: the band's own projection (a patch reads only its own rows) plus
    the whole image's positional embedding at the band's token rows."""
    latent = embed.proj(band)
    if embed.flatten:
        latent = latent.flatten(2).transpose(1, 2)
    if embed.layer_norm:
        latent = embed.norm(latent)
    if embed.pos_embed is None:
        return latent
    size, width = embed.patch_size, band.shape[-1]
    grid = (rows // size, width // size)
    if embed.pos_embed_max_size:
        pos = embed.cropped_pos_embed(rows, width)
    elif (embed.height, embed.width) != grid:
        pos = get_2d_sincos_pos_embed(
            embed_dim=embed.pos_embed.shape[-1], grid_size=grid, base_size=embed.base_size,
            interpolation_scale=embed.interpolation_scale, device=latent.device,
            output_type="pt").float().unsqueeze(0)
    else:
        pos = embed.pos_embed
    start = first_row // size * grid[1]
    return (latent + pos[:, start:start + latent.shape[1]]).to(latent.dtype)


def t5_token_limit(pipeline_class: Any) -> int:
    """The T5 prompt length a DiT pipeline encodes by default (PixArt-α 120, PixArt-Σ 300, SD3
    256, Flux 512)."""
    signature = inspect.signature(pipeline_class.encode_prompt)
    return int(signature.parameters["max_sequence_length"].default)


def t5_tokens(pipe: Any, t5_tokenizer: Any) -> int:
    """The T5 prompt length: the pipeline's default, or the tokenizer's limit if shorter."""
    return min(t5_token_limit(type(pipe)), int(t5_tokenizer.model_max_length))
