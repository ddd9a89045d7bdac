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

from paraflow.errors import ParaflowError
from paraflow.strategies.patch.attention import PatchSelfAttnProcessor, attend_heads, split_heads


class UlyssesAttnProcessor(PatchSelfAttnProcessor):
    def self_attention(self, attn: Any, query: torch.Tensor, key: torch.Tensor,
                       value: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        comm, band = self.state.comm, self.state.band
        n, heads = comm.world_size, attn.heads
        if heads % n:
            raise ParaflowError(f"{self.key}: {heads} heads do not divide over {n} ranks")
        if mask is not None:
            raise ParaflowError(f"{self.key}: Ulysses attention takes no self-attention mask")
        batch, tokens, _ = query.shape
        share = heads // n
        counts = band.scaled(tokens)
        # (3, B, heads, tokens, dim) → to rank j: its head group j of this band's tokens.
        qkv = torch.stack([split_heads(attn, x) for x in (query, key, value)])
        dim = qkv.shape[-1]
        pieces = [qkv[:, :, j * share:(j + 1) * share].contiguous() for j in range(n)]
        got = comm.all_to_all(pieces, [(3, batch, share, c, dim) for c in counts])
        whole = torch.cat(got, dim=3)  # every band's tokens, in image order
        out = attend_heads(attn, whole[0], whole[1], whole[2], None)  # (B, share, all, dim)
        starts = [sum(counts[:i]) for i in range(n)]
        back = [out[:, :, s:s + c].contiguous() for s, c in zip(starts, counts)]
        mine = comm.all_to_all(back, [(batch, share, tokens, dim)] * n)
        return torch.cat(mine, dim=1).transpose(1, 2).flatten(2)  # heads in order
