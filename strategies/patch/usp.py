"""USPAttnProcessor: Ulysses × Ring (the unified sequence parallelism of Fang & Zhao, 2024).

The bands of one image sit on a grid of ring_degree rows × ulysses_degree columns, row-major: a
row is `ulysses_degree` consecutive bands (a segment of the image). Inside self-attention each
row re-shards its tokens to heads by Ulysses' all-to-all (strategies/patch/ulysses.py), so a
rank holds its head share of its segment's tokens; the segments' keys/values of that share then
travel around the column's ring (strategies/patch/ring.py), and the output re-shards back.
Communicated per self-attention: Ulysses' all-to-alls within a row, and ring_degree − 1 hops of
a segment's head share of keys/values within a column. Exact. Heads need not divide by
ulysses_degree (uneven shares, as Ulysses deals them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from paraflow.comm import Communicator
from paraflow.strategies.patch.ring import ring_attention, ring_joint
from paraflow.strategies.patch.state import PatchState
from paraflow.strategies.patch.ulysses import UlyssesAttnProcessor


@dataclass(frozen=True)
class USPGroups:
    ulysses: Communicator  # this rank's row: consecutive bands, one segment
    ring: Communicator  # this rank's column: the same head share of every segment


class USPAttnProcessor(UlyssesAttnProcessor):
    def __init__(self, state: PatchState, key: str, groups: USPGroups) -> None:
        super().__init__(state, key)
        self.groups = groups

    @property
    def group(self) -> Communicator:
        return self.groups.ulysses

    def group_tokens(self, tokens: int) -> list[int]:
        width, row = self.groups.ulysses.world_size, self.groups.ring.rank
        return self.state.band.scaled(tokens)[row * width:(row + 1) * width]

    def _segment_tokens(self, tokens: int) -> list[int]:
        """Every segment's tokens at the level where this rank's segment has `tokens`."""
        width, sizes = self.groups.ulysses.world_size, self.state.band.sizes
        segments = [sum(sizes[i:i + width]) for i in range(0, len(sizes), width)]
        mine = segments[self.groups.ring.rank]
        return [n * tokens // mine for n in segments]

    def attend_share(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     scale: float | None, image: slice | None = None) -> torch.Tensor:
        ring = self.groups.ring
        if image is None:
            counts = self._segment_tokens(key.shape[2])
            return ring_attention(query, key, value, ring, counts, scale=scale)
        counts = self._segment_tokens(image.stop - image.start)
        return ring_joint(query, key, value, image, ring, counts, scale)
