"""Joint text-image attention on a band of image tokens, by the kind a family names
(Family.attention_kind): "joint" — image tokens then text (SD3's MMDiT blocks), "text_first" —
text then image, the text through added projections in a two-stream block or leading the input
of a single-stream one (Flux, and other MMDiTs that lead with the text). Each processor is
diffusers' own (JointAttnProcessor2_0, FluxAttnProcessor and its kind) step for step, with the
attention itself left to the strategy's core processor (`joint_attention`): the keys/values
all-gather of sync_patch, its displaced form, or Ulysses' all-to-alls.

Split: the image tokens (this band's rows). The text tokens are held whole by every rank: their
projections are computed on every rank, nothing of them is sent (but Ulysses' head shares of the
text's attention output). Rotary positions are applied before any exchange, at the band's true
positions (the family's call makes Flux's image ids for the band's rows).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.embeddings import apply_rotary_emb

from paraflow.errors import ParaflowError
from paraflow.strategies.patch.attention import PatchSelfAttnProcessor, split_heads


def band_processor(kind: str, core: PatchSelfAttnProcessor) -> Any:
    """The processor for a self-attention of `kind` (its family's attention_kind): `core`
    itself for plain self-attention, else the joint processor of that kind around it."""
    if kind == "text_first":
        return TextFirstBandAttnProcessor(core)
    if kind == "joint":
        return JointBandAttnProcessor(core)
    if kind != "plain":
        raise ParaflowError(f"{core.key}: attention kind {kind!r} has no band processor; "
                            "kinds: plain, joint, text_first")
    return core


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


class TextFirstBandAttnProcessor:
    """Text tokens first, then the band's image tokens; in a two-stream block the text comes
    through the added projections, in a single-stream block it leads the input (its length is
    the call's text length, PatchState.context_tokens). Rotary positions where the model passes
    them (Flux); the output projection where the module has one (a single-stream Flux block
    projects after the attention, outside it)."""

    def __init__(self, core: PatchSelfAttnProcessor) -> None:
        self.core = core

    def __call__(self, attn: Any, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: Any = None, **kwargs: Any) -> Any:
        _no_mask(self.core, attention_mask)
        query, key, value = (self._heads(attn, layer(hidden_states))
                             for layer in (attn.to_q, attn.to_k, attn.to_v))  # (B, T, H, d)
        query, key = _normed(attn.norm_q, query), _normed(attn.norm_k, key)
        if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
            text = encoder_hidden_states.shape[1]  # a two-stream block
            text_q, text_k, text_v = (
                self._heads(attn, layer(encoder_hidden_states))
                for layer in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            text_q = _normed(attn.norm_added_q, text_q)
            text_k = _normed(attn.norm_added_k, text_k)
            query, key, value = (torch.cat(pair, dim=1) for pair in
                                 ((text_q, query), (text_k, key), (text_v, value)))
        else:
            text = self.core.state.context_tokens
        if image_rotary_emb is not None:
            query, key = _rotated(query, image_rotary_emb), _rotated(key, image_rotary_emb)
        out = self.core.joint_attention(query.transpose(1, 2), key.transpose(1, 2),
                                        value.transpose(1, 2), slice(text, query.shape[1]))
        out = out.transpose(1, 2).flatten(2).to(query.dtype)
        to_out = getattr(attn, "to_out", None)
        if encoder_hidden_states is None:
            return out if to_out is None else to_out[1](to_out[0](out))
        image_out = attn.to_out[1](attn.to_out[0](out[:, text:].contiguous()))
        return image_out, attn.to_add_out(out[:, :text].contiguous())

    @staticmethod
    def _heads(attn: Any, x: torch.Tensor) -> torch.Tensor:
        """(B, T, H · d) → (B, T, H, d), H the module's heads (a tensor-parallel share)."""
        return x.unflatten(-1, (attn.heads, -1))


def _rotated(x: torch.Tensor, rotary: Any) -> torch.Tensor:
    """Rotary positions applied to (B, T, H, d) queries or keys."""
    return apply_rotary_emb(x, rotary, sequence_dim=1)  # type: ignore[return-value]


def _normed(norm: Any, x: torch.Tensor) -> torch.Tensor:
    return x if norm is None else norm(x)
