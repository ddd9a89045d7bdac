"""Flux.1: an MMDiT with single-stream blocks, rotary positions from image ids, latents packed
2×2 into tokens, T5 text with one CLIP's pooled embedding; guidance-distilled (dev embeds the
guidance scale as an input), flow matching with sigmas from 1 to 1/steps shifted by the image's
token count."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.models.transformers.transformer_flux import FluxAttention
from torch import nn

from paraflow.families.base import BaseFamily, Conditioning
from paraflow.families.patched import t5_tokens
from paraflow.families.shift import resolution_shift

PACK = 2  # Flux packs 2×2 latent pixels into one token
_DOUBLE, _SINGLE = "transformer_blocks.*", "single_transformer_blocks.*"


class FluxFamily(BaseFamily):
    name = "flux"
    denoisers = ("FluxTransformer2DModel",)
    flow_matching = True
    tensor_plan = {
        f"{_DOUBLE}.norm1*.linear": "colwise_gather", f"{_SINGLE}.norm.linear": "colwise_gather",
        f"{_DOUBLE}.attn.to_[qkv]": "colwise", f"{_DOUBLE}.attn.add_[qkv]_proj": "colwise",
        f"{_DOUBLE}.attn.to_out.0": "rowwise", f"{_DOUBLE}.attn.to_add_out": "rowwise",
        f"{_DOUBLE}.attn": "heads",
        f"{_DOUBLE}.ff*.net.0.proj": "colwise", f"{_DOUBLE}.ff*.net.2": "rowwise",
        f"{_SINGLE}.attn.to_[qkv]": "colwise", f"{_SINGLE}.attn": "heads",
        f"{_SINGLE}.proj_mlp": "colwise", f"{_SINGLE}.proj_out": "rowwise_concat",
    }

    def downsampling(self, config: Mapping[str, Any]) -> int:
        return int(config.get("patch_size") or 1) * PACK  # a token row is 2 latent rows

    def latent_channels(self, config: Mapping[str, Any]) -> int:
        return int(config["in_channels"]) // PACK ** 2

    def context_width(self, config: Mapping[str, Any]) -> int:
        return int(config["joint_attention_dim"])

    def guidance_distilled(self, config: Mapping[str, Any]) -> bool:
        """No classifier-free guidance (FluxPipeline's separate `true_cfg_scale` passes are not
        run); dev's guidance is an embedded input."""
        return True

    def conditioning_extras(self, config: Mapping[str, Any],
                            tokens: int) -> dict[str, tuple[int, ...]] | None:
        pooled: dict[str, tuple[int, ...]] = {
            "pooled_projections": (int(config["pooled_projection_dim"]),)}
        return {**pooled, "guidance": ()} if config.get("guidance_embeds") else pooled

    def prompt_tokenizers(self) -> tuple[tuple[str, bool], ...]:
        return (("tokenizer_2", True),)

    def encode_prompts(self, pipe: Any, prompts: list[str], negative_prompt: str | None,
                       device: torch.device, guidance: bool, height: int, width: int,
                       clip_skip: int | None = None, micro: Any = None) -> Conditioning:
        """T5 embeddings and the CLIP's pooled ones (Flux takes no negative prompt)."""
        embeds, pooled, _ = pipe.encode_prompt(
            prompts, None, device=device, max_sequence_length=t5_tokens(pipe, pipe.tokenizer_2))
        return Conditioning(embeds, {"pooled_projections": pooled})

    def prepare_conditioning(self, config: Mapping[str, Any], cond: Conditioning,
                             guidance_scale: float, batch: int) -> Conditioning:
        """Flux-dev's guidance scale as the transformer's `guidance` input, one per image."""
        if not config.get("guidance_embeds"):
            return cond
        guidance = torch.full((batch,), guidance_scale, dtype=torch.float32,
                              device=cond.embeds.device)
        return Conditioning(cond.embeds, {**(cond.added or {}), "guidance": guidance})

    def set_timesteps(self, scheduler: Any, steps: int, device: torch.device,
                      config: Mapping[str, Any], latent_shape: Sequence[int]) -> None:
        unit = self.downsampling(config)
        tokens = (latent_shape[-2] // unit) * (latent_shape[-1] // unit)
        shift = resolution_shift(scheduler, tokens, max_shift=1.15)
        if scheduler.config.get("use_flow_sigmas"):
            scheduler.set_timesteps(steps, device=device, **shift)
        else:
            scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), device=device,
                                    **shift)

    def forward(self, model: nn.Module, latents: torch.Tensor, timestep: torch.Tensor,
                cond: Conditioning, first_row: int = 0) -> torch.Tensor:
        """FluxPipeline's transformer call: latents packed, image ids over the token grid (the
        true rows of a band that starts at `first_row`), zero text ids, the timestep / 1000."""
        batch, channels, rows, cols = latents.shape
        packed = FluxPipeline._pack_latents(latents, batch, channels, rows, cols)
        img_ids = FluxPipeline._prepare_latent_image_ids(
            batch, rows // PACK, cols // PACK, latents.device, latents.dtype)
        img_ids[:, 1] += first_row // PACK
        txt_ids = torch.zeros(cond.embeds.shape[1], 3, device=latents.device, dtype=latents.dtype)
        if timestep.dim() == 0:
            timestep = timestep.reshape(1).expand(batch)
        added = cond.added or {}
        out = model(hidden_states=packed, timestep=timestep.to(latents.dtype) / 1000,
                    guidance=added.get("guidance"), pooled_projections=added["pooled_projections"],
                    encoder_hidden_states=cond.embeds, txt_ids=txt_ids, img_ids=img_ids,
                    return_dict=False)[0]
        # _unpack_latents takes pixel sizes and the VAE's factor: latent sizes with a factor of 1.
        return FluxPipeline._unpack_latents(out, rows, cols, 1)  # type: ignore[no-any-return]

    def attention_kind(self, module: nn.Module) -> str:
        return "text_first" if isinstance(module, FluxAttention) else "plain"
