"""PatchSelfAttnProcessor: self-attention of this band's queries over the whole image.

Split: the query tokens (this band's rows). Communicated: the keys and values of every band,
all-gathered (padded to the longest band), fresh on synchronous steps; after warm-up of displaced
patch parallelism the other bands' keys/values are the previous step's and this band's are fresh.
Installed through diffusers' attention-processor interface; the projections, norms and output
layers are the Attention module's own.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from paraflow.attention import attend as attend_on_backend
from paraflow.errors import ParaflowError
from paraflow.strategies.patch.state import PatchState


def split_heads(attn: Any, x: torch.Tensor, heads: int | None = None) -> torch.Tensor:
    """(B, tokens, heads · dim) → (B, heads, tokens, dim)."""
    heads = heads or attn.heads
    return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def attend(attn: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           mask: torch.Tensor | None) -> torch.Tensor:
    """AttnProcessor2_0's attention of projected queries over keys/values, heads merged back:
    (B, tokens, heads · dim). The heads are `attn.heads` (a tensor-parallel share, if set)."""
    query, key, value = (split_heads(attn, x) for x in (query, key, value))
    return attend_heads(attn, query, key, value, mask).transpose(1, 2).flatten(2)


def attend_heads(attn: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 mask: torch.Tensor | None) -> torch.Tensor:
    """(B, heads, tokens, dim) in and out: the module's query/key norms, then fused attention
    with the module's scale."""
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    out = attend_on_backend(query, key, value, mask, scale=attn.scale)
    return out.to(query.dtype)


class PatchSelfAttnProcessor:
    """diffusers' AttnProcessor2_0, step for step, plus the exchange of keys and values; it also
    passes `attn.scale` to the attention (as diffusers' AttnProcessor does for scale_qk=False).
    A call with a context (cross-attention) exchanges nothing. A mask must cover the whole
    image's keys; a mask with one row per query is cut to this band's queries."""

    def __init__(self, state: PatchState, key: str) -> None:
        self.state, self.key = state, key

    def __call__(self, attn: Any, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, tokens, _ = hidden_states.shape
        exchange = encoder_hidden_states is None
        if attention_mask is not None:
            keys = (encoder_hidden_states.shape[1] if encoder_hidden_states is not None
                    else sum(self.state.band.scaled(tokens)))
            attention_mask = attn.prepare_attention_mask(attention_mask, keys, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
            if exchange:
                attention_mask = self._band_queries(attention_mask, tokens)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        if exchange:
            out = self.self_attention(attn, query, key, value, attention_mask)
        else:
            out = attend(attn, query, key, value, attention_mask)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def self_attention(self, attn: Any, query: torch.Tensor, key: torch.Tensor,
                       value: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """This band's queries over every band's keys and values (B, tokens, heads · dim)."""
        key, value = self._whole_image(torch.cat([key, value], dim=-1)).chunk(2, dim=-1)
        return attend(attn, query, key, value, mask)

    def joint_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        image: slice) -> torch.Tensor:
        """Joint attention (B, heads, tokens, dim) in and out, queries, keys and values normed
        and rotated: tokens `image` are this band's image tokens, the others (text) every
        rank's own. This band's queries and the text's attend over the whole image's keys and
        values and the text's."""
        heads, dim = key.shape[1], key.shape[-1]
        band_kv = torch.cat([key[:, :, image], value[:, :, image]], dim=-1)  # (B, H, t, 2d)
        whole = self._whole_image(band_kv.transpose(1, 2).flatten(2))  # (B, T, H · 2d)
        whole_k, whole_v = whole.unflatten(-1, (heads, 2 * dim)).transpose(1, 2).chunk(2, -1)
        key, value = (torch.cat([x[:, :, :image.start], w, x[:, :, image.stop:]], dim=2)
                      for x, w in ((key, whole_k), (value, whole_v)))
        return attend_on_backend(query, key, value)

    def _band_queries(self, mask: torch.Tensor, tokens: int) -> torch.Tensor:
        """(B, heads, queries, keys) → this band's query rows (a one-row mask is kept)."""
        if mask.shape[2] == 1:
            return mask
        counts = self.state.band.scaled(tokens)
        if mask.shape[2] != sum(counts):
            raise ParaflowError(f"{self.key}: an attention mask with {mask.shape[2]} query rows "
                                f"for an image of {sum(counts)} tokens")
        start = sum(counts[: self.state.band.index])
        return mask[:, :, start:start + tokens]

    def _whole_image(self, kv: torch.Tensor) -> torch.Tensor:
        """(B, band tokens, 2D) → (B, image tokens, 2D): every band's K/V in image order."""
        state = self.state
        tokens = state.band.scaled(kv.shape[1])
        longest = max(tokens)
        piece = F.pad(kv, (0, 0, 0, longest - kv.shape[1])) if kv.shape[1] < longest else kv
        if state.synchronous:
            pieces = state.gather(self.key, piece)
        else:
            pieces = state.stale(self.key, piece)
        whole = torch.cat([p[:, :n] for p, n in zip(pieces, tokens)], dim=1)
        if not state.synchronous:
            state.publish(self.key, piece)
        return whole
