"""UlyssesAttnProcessor: self-attention of a band's tokens by a share of the heads over the
whole image (the DeepSpeed-Ulysses scheme).

Split: the tokens (this rank's band) everywhere but inside self-attention, where each rank
holds all tokens of its share of the heads. Communicated: two all-to-alls per self-attention —
this band's queries, keys and values of every head share to the share's rank (3 · band tokens ·
width · (N − 1)/N per rank), and the attention output back (band tokens · width · (N − 1)/N).
Unlike the keys/values all-gather of sync_patch, the bytes per rank shrink as ranks are added.
Exact. Heads that do not divide by N are dealt out unevenly (larger shares first, as bands are):
the ranks with one head more wait on the others, nothing is padded.

USP (strategies/patch/usp.py) runs the same re-shard over a Ulysses group of its bands and
replaces the attention over the gathered tokens (`attend_share`) by a ring over the groups.
"""

from __future__ import annotations

from typing import Any

import torch

from paraflow.attention import attend as attend_on_backend
from paraflow.comm import Communicator
from paraflow.errors import ParaflowError
from paraflow.strategies.patch.attention import PatchSelfAttnProcessor, split_heads


def head_shares(heads: int, ranks: int) -> list[int]:
    """Heads per rank: as even as can be, larger shares first (a rank may get none)."""
    base, extra = divmod(heads, ranks)
    return [base + (1 if i < extra else 0) for i in range(ranks)]


class UlyssesAttnProcessor(PatchSelfAttnProcessor):
    @property
    def group(self) -> Communicator:
        """The ranks that re-shard tokens to heads among themselves."""
        return self.state.comm

    def group_tokens(self, tokens: int) -> list[int]:
        """The band tokens of each rank of `group` at the level where this band has `tokens`."""
        return self.state.band.scaled(tokens)

    def attend_share(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     scale: float | None, image: slice | None = None) -> torch.Tensor:
        """Attention of a head share over the group's tokens (B, share, tokens, dim), normed
        and rotated; `image`: in joint attention, the rows of the group's image tokens (the
        others are the text's, every rank's alike)."""
        return attend_on_backend(query, key, value, scale=scale)

    def self_attention(self, attn: Any, query: torch.Tensor, key: torch.Tensor,
                       value: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is not None:
            raise ParaflowError(f"{self.key}: Ulysses attention takes no self-attention mask")
        qkv = torch.stack([split_heads(attn, x) for x in (query, key, value)])
        q, k, v = self._to_head_share(qkv)  # (B, share, group tokens, dim) each
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        out = self._attend_nonempty(q, k, v, attn.scale).to(q.dtype)
        return self._to_token_share(out, query.shape[1], qkv.shape[2]).transpose(1, 2).flatten(2)

    def joint_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        image: slice) -> torch.Tensor:
        """Joint attention (B, heads, tokens, dim): the band's image tokens re-shard to this
        rank's head share of the group's image tokens; the text tokens of that share are sliced
        here (every rank has them all). The text's attention output is all-gathered by head
        share (text tokens · width · (N − 1)/N more per rank)."""
        qkv = torch.stack([query, key, value])
        whole = self._to_head_share(qkv[:, :, :, image])
        shares = head_shares(query.shape[1], self.group.world_size)
        first = sum(shares[: self.group.rank])
        mine = slice(first, first + shares[self.group.rank])
        before, after = qkv[:, :, mine, :image.start], qkv[:, :, mine, image.stop:]
        q, k, v = torch.cat([before, whole, after], dim=3)
        start, stop = before.shape[3], before.shape[3] + whole.shape[3]
        out = self._attend_nonempty(q, k, v, None, image=slice(start, stop))
        image_out = self._to_token_share(out[:, :, start:stop], image.stop - image.start,
                                         query.shape[1])
        text = torch.cat([out[:, :, :start], out[:, :, stop:]], dim=2)
        text_all = self._all_head_shares(text, shares)
        return torch.cat([text_all[:, :, :start], image_out, text_all[:, :, start:]], dim=2)

    def _attend_nonempty(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         scale: float | None, image: slice | None = None) -> torch.Tensor:
        """attend_share, skipped by a rank whose share has no heads (more ranks than heads)."""
        if q.shape[1] == 0:
            return q.new_empty(q.shape)
        if image is not None and image.start == 0 and image.stop == q.shape[2]:
            image = None  # no text rows
        return self.attend_share(q, k, v, scale, image)

    def _to_head_share(self, qkv: torch.Tensor) -> torch.Tensor:
        """(3, B, heads, band tokens, dim) → (3, B, share, group tokens, dim): rank j gets head
        share j of every group rank's tokens, in image order."""
        comm = self.group
        shares = head_shares(qkv.shape[2], comm.world_size)
        starts = [sum(shares[:j]) for j in range(len(shares))]
        pieces = [qkv[:, :, s:s + n].contiguous() for s, n in zip(starts, shares)]
        mine = shares[comm.rank]
        shapes = [(3, qkv.shape[1], mine, c, qkv.shape[-1])
                  for c in self.group_tokens(qkv.shape[3])]
        return torch.cat(comm.all_to_all(pieces, shapes), dim=3)

    def _to_token_share(self, out: torch.Tensor, tokens: int, heads: int) -> torch.Tensor:
        """(B, share, group tokens, dim) → (B, heads, this band's tokens, dim)."""
        comm, counts = self.group, self.group_tokens(tokens)
        starts = [sum(counts[:i]) for i in range(len(counts))]
        back = [out[:, :, s:s + c].contiguous() for s, c in zip(starts, counts)]
        batch, _, _, dim = out.shape
        shapes = [(batch, n, tokens, dim) for n in head_shares(heads, comm.world_size)]
        return torch.cat(comm.all_to_all(back, shapes), dim=1)

    def _all_head_shares(self, text: torch.Tensor, shares: list[int]) -> torch.Tensor:
        """Every rank's head share of the text's output (B, heads, text, dim), padded to the
        largest share for the all-gather."""
        widest = max(shares)
        if text.shape[1] < widest:
            pad = text.new_zeros((text.shape[0], widest - text.shape[1], *text.shape[2:]))
            text = torch.cat([text, pad], dim=1)
        gathered = self.group.all_gather(text.contiguous())
        return torch.cat([g[:, :n] for g, n in zip(gathered, shares)], dim=1)
