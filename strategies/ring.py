"""Ring attention on bands: bands of rows as in sync_patch (halo rows for convolutions, GroupNorm
statistics), but self-attention passes each band's keys and values around the ring of ranks and
merges the partial results by their log-sum-exp (strategies/patch/ring.py). Exact, for any head
count and any band split; for UNets and diffusion transformers alike."""

from __future__ import annotations

from paraflow.strategies.patch.ring import RingAttnProcessor
from paraflow.strategies.patch.strategy import PatchParallel


class Ring(PatchParallel):
    name = "ring"
    attention_processor = RingAttnProcessor

    def __init__(self, cfg_split: bool = False, data_degree: int = 1,
                 shard_weights: bool = False) -> None:
        super().__init__(cfg_split=cfg_split, data_degree=data_degree,
                         shard_weights=shard_weights)
