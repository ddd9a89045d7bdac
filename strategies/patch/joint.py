"""Joint text-image attention on a band of image tokens: SD3's MMDiT blocks and Flux's double-
and single-stream blocks. Each processor is diffusers' own (JointAttnProcessor2_0,
FluxAttnProcessor) step for step, with the attention itself left to the strategy's core
processor (`joint_attention`): the keys/values all-gather of sync_patch, its displaced form, or
Ulysses' all-to-alls.

Split: the image tokens (this band's rows). The text tokens are held whole by every rank: their
projections are computed on every rank, nothing of them is sent (but Ulysses' head shares of the
text's attention output). Rotary positions are applied before any exchange, at the band's true
positions (the denoiser hooks cut Flux's image ids to the band).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.embeddings import apply_rotary_emb

from paraflow.adapters import attention_kind
from paraflow.errors import ParaflowError
from paraflow.strategies.patch.attention import PatchSelfAttnProcessor, split_heads


def band_processor(module: Any, core: PatchSelfAttnProcessor) -> Any:
    """The processor for `module`: `core` itself for plain self-attention, else the joint
    processor of the module's kind around it."""
    kind = attention_kind(module)
    if kind == "flux":
        return FluxBandAttnProcessor(core)
    return JointBandAttnProcessor(core) if kind == "joint" else core


def _no_mask(core: PatchSelfAttnProcessor, mask: torch.Tensor | None) -> None:
    if mask is not None:
        raise ParaflowError(f"{core.key}: joint attention on bands takes no attention mask")


class JointBandAttnProcessor:
    """SD3: the band's image tokens, then the text tokens (absent in SD3.5's second, image-only
    attention)."""

    def __init__(self, core: PatchSelfAttnProcessor) -> None:
        self.core = core

    def __call__(self, attn: Any, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args: Any,
                 **kwargs: Any) -> Any:
        _no_mask(self.core, attention_mask)
        image = hidden_states.shape[1]
        query, key, value = (split_heads(attn, layer(hidden_states))
                             for layer in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            text_q, text_k, text_v = (split_heads(attn, layer(encoder_hidden_states)) for layer
                                      in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                text_q = attn.norm_added_q(text_q)
            if attn.norm_added_k is not None:
                text_k = attn.norm_added_k(text_k)
            query, key, value = (torch.cat(pair, dim=2) for pair in
                                 ((query, text_q), (key, text_k), (value, text_v)))
        out = self.core.joint_attention(query, key, value, slice(0, image))
        out = out.transpose(1, 2).flatten(2).to(query.dtype)
        image_out = attn.to_out[1](attn.to_out[0](out[:, :image]))
        if encoder_hidden_states is None:
            return image_out
        text_out = out[:, image:]
        if not attn.context_pre_only:
            text_out = attn.to_add_out(text_out)
        return image_out, text_out


class FluxBandAttnProcessor:
    """Flux: text tokens first, then the band's image tokens; in a double-stream block the text
    comes through the added projections, in a single-stream block it leads the input (its length
    is the call's text length, PatchState.context_tokens)."""

    def __init__(self, core: PatchSelfAttnProcessor) -> None:
        self.core = core

    def __call__(self, attn: Any, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: Any = None) -> Any:
        _no_mask(self.core, attention_mask)
        query, key, value = (layer(hidden_states).unflatten(-1, (-1, attn.head_dim))
                             for layer in (attn.to_q, attn.to_k, attn.to_v))  # (B, T, H, d)
        query, key = attn.norm_q(query), attn.norm_k(key)
        if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
            text = encoder_hidden_states.shape[1]  # a double-stream block
            text_q, text_k, text_v = (
                layer(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
                for layer in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            text_q, text_k = attn.norm_added_q(text_q), attn.norm_added_k(text_k)
            query, key, value = (torch.cat(pair, dim=1) for pair in
                                 ((text_q, query), (text_k, key), (text_v, value)))
        else:
            text = self.core.state.context_tokens
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = self.core.joint_attention(query.transpose(1, 2), key.transpose(1, 2),
                                        value.transpose(1, 2), slice(text, query.shape[1]))
        out = out.transpose(1, 2).flatten(2).to(query.dtype)
        if encoder_hidden_states is None:
            return out
        image_out = attn.to_out[1](attn.to_out[0](out[:, text:].contiguous()))
        return image_out, attn.to_add_out(out[:, :text].contiguous())
