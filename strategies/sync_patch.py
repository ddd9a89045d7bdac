"""Synchronous patch parallelism: each rank runs every layer on its band of rows and fetches
what it needs from the other bands fresh at every layer of every step (halo rows for k×k
convolutions, the whole image's keys/values for self-attention, global GroupNorm statistics).
Exact: the single-device result within float tolerance."""

from __future__ import annotations

from paraflow.strategies.patch.strategy import PatchParallel


class SyncPatch(PatchParallel):
    name = "sync_patch"

    def __init__(self, cfg_split: bool = False, data_degree: int = 1,
                 shard_weights: bool = False) -> None:
        super().__init__(cfg_split=cfg_split, data_degree=data_degree,
                         shard_weights=shard_weights)
