"""Ulysses sequence parallelism: bands of rows as in sync_patch (halo rows for convolutions,
GroupNorm statistics), but self-attention re-shards from tokens to heads with two all-to-alls
instead of gathering every band's keys and values (strategies/patch/ulysses.py). Exact.
For UNets and diffusion transformers alike. Heads that do not divide by the number of bands are
dealt out unevenly (the ranks with a head more set the pace; with more bands than heads some
ranks attend to nothing): `ring` or `usp` may then be faster."""

from __future__ import annotations

from paraflow.strategies.patch.strategy import PatchParallel
from paraflow.strategies.patch.ulysses import UlyssesAttnProcessor


class Ulysses(PatchParallel):
    name = "ulysses"
    attention_processor = UlyssesAttnProcessor

    def __init__(self, cfg_split: bool = False, data_degree: int = 1,
                 shard_weights: bool = False) -> None:
        super().__init__(cfg_split=cfg_split, data_degree=data_degree,
                         shard_weights=shard_weights)
