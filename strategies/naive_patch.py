"""Naive patch parallelism: each rank denoises its band of latent rows with no interaction
(convolutions zero-pad at the band edges, attention and GroupNorm see the band only); the bands
are gathered after each UNet call. Fast, with visible seams: the baseline."""

from __future__ import annotations

from paraflow.strategies.patch.strategy import PatchParallel


class NaivePatch(PatchParallel):
    name = "naive_patch"
    exchange = False

    def __init__(self, cfg_split: bool = False, data_degree: int = 1,
                 shard_weights: bool = False) -> None:
        super().__init__(cfg_split=cfg_split, data_degree=data_degree,
                         shard_weights=shard_weights)
