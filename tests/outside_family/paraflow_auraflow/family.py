"""AuraFlow: an MMDiT over UMT5 text with 8 register tokens before the text, two-stream blocks
then single-stream blocks (text first in both), a learned position table cropped at the centre,
flow matching with the timestep over 1000."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers.models.transformers.auraflow_transformer_2d import AuraFlowPatchEmbed
from torch import nn

from paraflow.families import Conditioning
from paraflow.families.base import BaseFamily
from paraflow.families.patched import t5_tokens

REGISTER_TOKENS = 8  # AuraFlowTransformer2DModel puts these before the text


class AuraFlowFamily(BaseFamily):
    name = "auraflow"
    denoisers = ("AuraFlowTransformer2DModel",)
    flow_matching = True
    takes_lora = False

    def context_width(self, config: Mapping[str, Any]) -> int:
        return int(config["joint_attention_dim"])

    def prompt_tokenizers(self) -> tuple[tuple[str, bool], ...]:
        return (("tokenizer", True),)

    def encode_prompts(self, pipe: Any, prompts: list[str], negative_prompt: str | None,
                       device: torch.device, guidance: bool, height: int, width: int,
                       clip_skip: int | None = None, micro: Any = None) -> Conditioning:
        negative = None if negative_prompt is None else [negative_prompt] * len(prompts)
        cond, _, uncond, _ = pipe.encode_prompt(
            prompts, negative_prompt=negative, do_classifier_free_guidance=guidance,
            device=device, max_sequence_length=t5_tokens(pipe, pipe.tokenizer))
        return Conditioning(torch.cat([uncond, cond]) if guidance else cond, None)

    def forward(self, model: nn.Module, latents: torch.Tensor, timestep: torch.Tensor,
                cond: Conditioning, first_row: int = 0) -> torch.Tensor:
        """AuraFlowPipeline's call: the timestep over 1000, one per image."""
        if timestep.dim() == 0:
            timestep = timestep.reshape(1).expand(latents.shape[0])
        out = model(latents, encoder_hidden_states=cond.embeds,
                    timestep=(timestep / 1000).to(latents.dtype), return_dict=False)
        return out[0]  # type: ignore[no-any-return]

    def patch_embedding(self, model: nn.Module) -> nn.Module | None:
        embed = getattr(model, "pos_embed", None)
        return embed if isinstance(embed, AuraFlowPatchEmbed) else None

    def band_patch_embed(self, embed: Any, band: torch.Tensor, rows: int,
                         first_row: int) -> torch.Tensor:
        """AuraFlowPatchEmbed.forward on a band: its own patches, the whole image's positions
        (the centred crop of the table) at the band's token rows."""
        batch, channels, height, width = band.shape
        size = embed.patch_size
        tokens = band.view(batch, channels, height // size, size, width // size, size)
        tokens = embed.proj(tokens.permute(0, 2, 4, 1, 3, 5).flatten(-3).flatten(1, 2))
        index = embed.pe_selection_index_based_on_dim(rows, width)
        start = first_row // size * (width // size)
        return tokens + embed.pos_embed[:, index[start:start + tokens.shape[1]]]

    def attention_text_tokens(self, config: Mapping[str, Any], text_tokens: int) -> int:
        return text_tokens + REGISTER_TOKENS

    def attention_kind(self, module: nn.Module) -> str:
        return "text_first"  # both block kinds put the text (and registers) first
