"""Ring attention: a band's queries over every band's keys and values, the keys/values passed
around the ring of ranks one hop at a time and the partial results merged exactly by their
log-sum-exp (the online softmax).

Split: the tokens (this rank's band), everywhere, attention included. Communicated: per
self-attention, N − 1 point-to-point hops, each sending the keys and values this rank holds to
the next rank (2 · band tokens · width per hop; (N − 1)/N of the image's keys/values per rank in
all, as sync_patch's all-gather, but never more than two bands' worth in memory). Each hop's
transfer runs while the attention over the keys/values already here is computed. Any head count,
uneven bands. Exact: the merge is the softmax's own algebra, in fp32.

Written here rather than taken from torch's context parallel (`_templated_ring_attention`) or
diffusers' ContextParallelConfig(ring_degree): both need equal shards of the sequence (paraflow's
bands are uneven), neither takes joint attention's text tokens held whole by every rank, and
their transfers bypass paraflow's communicator (the bytes the planner checks against gloo).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from paraflow.attention import attend_with_lse
from paraflow.comm import Communicator
from paraflow.errors import ParaflowError
from paraflow.strategies.patch.attention import PatchSelfAttnProcessor, split_heads


class _Merged:
    """The running softmax merge of partial attentions (B, heads, queries, dim) in fp32."""

    def __init__(self) -> None:
        self.out: torch.Tensor | None = None
        self.lse: torch.Tensor | None = None

    def add(self, out: torch.Tensor, lse: torch.Tensor) -> None:
        out, lse = out.float(), lse.float()
        if self.out is None or self.lse is None:
            self.out, self.lse = out, lse
            return
        total = torch.logaddexp(self.lse, lse)
        self.out = (self.out * torch.exp(self.lse - total).unsqueeze(-1)
                    + out * torch.exp(lse - total).unsqueeze(-1))
        self.lse = total


def ring_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   comm: Communicator, key_counts: Sequence[int], scale: float | None = None,
                   whole: tuple[torch.Tensor, torch.Tensor] | None = None,
                   shared: slice | None = None) -> torch.Tensor:
    """Queries (B, h, q, d) over the keys/values of every rank of `comm`'s ring; this rank's
    are `key`, `value` (B, h, key_counts[rank], d). `whole`: keys/values every rank holds alike
    (joint attention's text), attended once. `shared`: query rows every rank holds alike (the
    text's); they are merged in one fixed order, so every rank gets the same bits."""
    n, me = comm.world_size, comm.rank
    kv = torch.cat([key, value], dim=-1).contiguous()
    width = key.shape[-1]
    merged, parts = _Merged(), []
    if whole is not None:
        out, lse = attend_with_lse(query, *whole, scale=scale)
        merged.add(out, lse)
        if shared is not None:
            parts.append((-1, out[:, :, shared], lse[:, :, shared]))
    for hop in range(n):
        source = (me - hop) % n  # whose keys/values are here now
        handle = None
        if hop < n - 1:  # send on while this hop's attention runs
            coming = (me - hop - 1) % n
            handle = comm.shift_async(kv, (*kv.shape[:2], key_counts[coming], kv.shape[-1]))
        out, lse = attend_with_lse(query, kv[..., :width], kv[..., width:], scale=scale)
        merged.add(out, lse)
        if shared is not None:
            parts.append((source, out[:, :, shared], lse[:, :, shared]))
        if handle is not None:
            kv = handle.wait()
    result = merged.out
    assert result is not None
    if shared is not None and n > 1:
        fixed = _Merged()
        for _, out, lse in sorted(parts, key=lambda part: part[0]):
            fixed.add(out, lse)
        assert fixed.out is not None
        result = result.clone()
        result[:, :, shared] = fixed.out
    return result.to(query.dtype)


class RingAttnProcessor(PatchSelfAttnProcessor):
    """The band processor with ring attention in place of the keys/values all-gather."""

    def self_attention(self, attn: Any, query: torch.Tensor, key: torch.Tensor,
                       value: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is not None:
            raise ParaflowError(f"{self.key}: ring attention takes no self-attention mask")
        query, key, value = (split_heads(attn, x) for x in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        counts = self.state.band.scaled(key.shape[2])
        out = ring_attention(query, key, value, self.state.comm, counts, scale=attn.scale)
        return out.transpose(1, 2).flatten(2)

    def joint_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        image: slice) -> torch.Tensor:
        counts = self.state.band.scaled(image.stop - image.start)
        return ring_joint(query, key, value, image, self.state.comm, counts, None)


def ring_joint(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, image: slice,
               comm: Communicator, key_counts: Sequence[int],
               scale: float | None) -> torch.Tensor:
    """Joint attention (B, heads, tokens, dim) by ring: the rows `image` are this rank's image
    tokens, whose keys/values ring; the others are the text's, every rank's alike: their
    keys/values are attended once and their queries merged in one order on every rank."""
    text = [slice(None, image.start), slice(image.stop, None)]
    text_k = torch.cat([key[:, :, s] for s in text], dim=2)
    text_v = torch.cat([value[:, :, s] for s in text], dim=2)
    band = image.stop - image.start
    queries = torch.cat([query[:, :, image], *(query[:, :, s] for s in text)], dim=2)
    out = ring_attention(queries, key[:, :, image], value[:, :, image], comm, key_counts,
                         scale=scale, whole=(text_k, text_v) if text_k.shape[2] else None,
                         shared=slice(band, None))
    image_out, text_out = out[:, :, :band], out[:, :, band:]
    return torch.cat([text_out[:, :, :image.start], image_out, text_out[:, :, image.start:]],
                     dim=2)
