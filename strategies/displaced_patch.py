"""Displaced patch parallelism (DistriFusion): synchronous for the first 1 + warmup_steps steps,
then each layer uses the other bands' activations from the previous step while this step's are
all-gathered asynchronously (bucketed), hidden behind the computation. GroupNorm statistics follow
`groupnorm`; `frozen` stops the refresh after warm-up (no communication: the speed ceiling)."""

from __future__ import annotations

from paraflow.strategies.patch.strategy import PatchParallel


class DisplacedPatch(PatchParallel):
    name = "displaced_patch"

    def __init__(self, cfg_split: bool = False, warmup_steps: int = 4,
                 groupnorm: str = "corrected_async", frozen: bool = False,
                 bucket_mb: float = 4.0, data_degree: int = 1,
                 shard_weights: bool = False) -> None:
        super().__init__(cfg_split=cfg_split, warmup_steps=warmup_steps, displaced=True,
                         groupnorm=groupnorm, frozen=frozen, bucket_mb=bucket_mb,
                         data_degree=data_degree, shard_weights=shard_weights)


class DistriFusion(DisplacedPatch):
    """The paper's preset: 4 warm-up steps after the first, corrected asynchronous GroupNorm."""

    name = "distrifusion"
