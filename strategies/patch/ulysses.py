"""UlyssesAttnProcessor: self-attention of a band's tokens by a share of the heads over the
whole image (the DeepSpeed-Ulysses scheme).

Split: the tokens (this rank's band) everywhere but inside self-attention, where each rank
holds all tokens of heads/N of the heads. Communicated: two all-to-alls per self-attention —
this band's queries, keys and values of every head group to the group's rank (3 · band tokens ·
width · (N − 1)/N per rank), and the attention output back (band tokens · width · (N − 1)/N).
Unlike the keys/values all-gather of sync_patch, the bytes per rank shrink as ranks are added.
Exact. Heads must divide by the number of bands (checked before launch).
"""

from __future__ import annotations

from typing import Any

import torch

from paraflow.attention import attend as attend_on_backend
from paraflow.errors import ParaflowError
from paraflow.strategies.patch.attention import PatchSelfAttnProcessor, attend_heads, split_heads


class UlyssesAttnProcessor(PatchSelfAttnProcessor):
    def self_attention(self, attn: Any, query: torch.Tensor, key: torch.Tensor,
                       value: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is not None:
            raise ParaflowError(f"{self.key}: Ulysses attention takes no self-attention mask")
        qkv = torch.stack([split_heads(attn, x) for x in (query, key, value)])
        whole = self._to_head_share(qkv)  # (3, B, share, all tokens, dim)
        out = attend_heads(attn, whole[0], whole[1], whole[2], None)
        return self._to_token_share(out, query.shape[1]).transpose(1, 2).flatten(2)

    def joint_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        image: slice) -> torch.Tensor:
        """Joint attention (B, heads, tokens, dim): the band's image tokens re-shard to this
        rank's head share of the whole image; the text tokens of that share are sliced here
        (every rank has them all). The text's attention output is all-gathered by head share,
        (text tokens · width · (N − 1)/N more per rank)."""
        qkv = torch.stack([query, key, value])
        whole = self._to_head_share(qkv[:, :, :, image])
        share = whole.shape[2]
        mine = slice(self.state.comm.rank * share, (self.state.comm.rank + 1) * share)
        before, after = qkv[:, :, mine, :image.start], qkv[:, :, mine, image.stop:]
        q, k, v = torch.cat([before, whole, after], dim=3)
        out = attend_on_backend(q, k, v)  # (B, share, text + image, dim)
        first, last = before.shape[3], before.shape[3] + whole.shape[3]
        image_out = self._to_token_share(out[:, :, first:last], image.stop - image.start)
        text = torch.cat([out[:, :, :first], out[:, :, last:]], dim=2).contiguous()
        text_all = torch.cat(self.state.comm.all_gather(text), dim=1)  # every head share
        return torch.cat([text_all[:, :, :first], image_out, text_all[:, :, first:]], dim=2)

    def _to_head_share(self, qkv: torch.Tensor) -> torch.Tensor:
        """(3, B, heads, band tokens, dim) → (3, B, heads/N, image tokens, dim): rank j gets
        head group j of every band's tokens, in image order."""
        comm, n = self.state.comm, self.state.comm.world_size
        heads, tokens = qkv.shape[2], qkv.shape[3]
        if heads % n:
            raise ParaflowError(f"{self.key}: {heads} heads do not divide over {n} ranks")
        share = heads // n
        pieces = [qkv[:, :, j * share:(j + 1) * share].contiguous() for j in range(n)]
        shapes = [(3, qkv.shape[1], share, c, qkv.shape[-1])
                  for c in self.state.band.scaled(tokens)]
        return torch.cat(comm.all_to_all(pieces, shapes), dim=3)

    def _to_token_share(self, out: torch.Tensor, tokens: int) -> torch.Tensor:
        """(B, heads/N, image tokens, dim) → (B, heads, this band's tokens, dim)."""
        comm, counts = self.state.comm, self.state.band.scaled(tokens)
        starts = [sum(counts[:i]) for i in range(len(counts))]
        back = [out[:, :, s:s + c].contiguous() for s, c in zip(starts, counts)]
        batch, share, _, dim = out.shape
        return torch.cat(comm.all_to_all(back, [(batch, share, tokens, dim)] * len(counts)),
                         dim=1)
