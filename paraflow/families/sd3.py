"""Stable Diffusion 3 / 3.5: an MMDiT (joint attention over image then text tokens) reading two
CLIPs' and T5's embeddings one after the other, with the CLIPs' pooled embeddings; flow
matching, shifted by resolution where the scheduler says so."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers.models.attention_processor import JointAttnProcessor2_0
from torch import nn

from paraflow.families.base import BaseFamily, Conditioning
from paraflow.families.patched import band_patch_embed, patch_embed_of, t5_tokens

_BLOCKS = "transformer_blocks.*"


class SD3Family(BaseFamily):
    name = "sd3"
    denoisers = ("SD3Transformer2DModel",)
    flow_matching = True
    tensor_plan = {  # attn2: SD3.5's second, image-only attention (in the blocks that have one)
        f"{_BLOCKS}.norm1*.linear": "colwise_gather",
        f"{_BLOCKS}.attn.to_[qkv]": "colwise", f"{_BLOCKS}.attn.add_[qkv]_proj": "colwise",
        f"{_BLOCKS}.attn.to_out.0": "rowwise", f"{_BLOCKS}.attn.to_add_out": "rowwise",
        f"{_BLOCKS}.attn": "heads",
        f"{_BLOCKS}.attn2.to_[qkv]": "colwise", f"{_BLOCKS}.attn2.to_out.0": "rowwise",
        f"{_BLOCKS}.attn2": "heads",
        f"{_BLOCKS}.ff*.net.0.proj": "colwise", f"{_BLOCKS}.ff*.net.2": "rowwise",
    }

    def context_width(self, config: Mapping[str, Any]) -> int:
        return int(config["joint_attention_dim"])

    def conditioning_extras(self, config: Mapping[str, Any],
                            tokens: int) -> dict[str, tuple[int, ...]] | None:
        return {"pooled_projections": (int(config["pooled_projection_dim"]),)}

    def prompt_tokenizers(self) -> tuple[tuple[str, bool], ...]:
        return (("tokenizer_3", True), ("tokenizer", False))

    def encode_prompts(self, pipe: Any, prompts: list[str], negative_prompt: str | None,
                       device: torch.device, guidance: bool, height: int, width: int,
                       clip_skip: int | None = None, micro: Any = None) -> Conditioning:
        negative = None if negative_prompt is None else [negative_prompt] * len(prompts)
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
            prompts, None, None, device=device, do_classifier_free_guidance=guidance,
            negative_prompt=negative, max_sequence_length=t5_tokens(pipe, pipe.tokenizer_3),
            clip_skip=clip_skip)
        if not guidance:
            return Conditioning(cond, {"pooled_projections": pooled})
        return Conditioning(torch.cat([uncond, cond]),
                            {"pooled_projections": torch.cat([uncond_pooled, pooled])})

    def forward(self, model: nn.Module, latents: torch.Tensor, timestep: torch.Tensor,
                cond: Conditioning, first_row: int = 0) -> torch.Tensor:
        if timestep.dim() == 0:
            timestep = timestep.reshape(1).expand(latents.shape[0])
        out = model(hidden_states=latents, timestep=timestep, encoder_hidden_states=cond.embeds,
                    pooled_projections=(cond.added or {})["pooled_projections"],
                    return_dict=False)
        return out[0]  # type: ignore[no-any-return]

    def patch_embedding(self, model: nn.Module) -> nn.Module | None:
        return patch_embed_of(model)

    def band_patch_embed(self, embed: nn.Module, band: torch.Tensor, rows: int,
                         first_row: int) -> torch.Tensor:
        return band_patch_embed(embed, band, rows, first_row)

    def attention_kind(self, module: nn.Module) -> str:
        processor = getattr(module, "processor", None)
        return "joint" if isinstance(processor, JointAttnProcessor2_0) else "plain"
