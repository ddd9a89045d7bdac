"""Ulysses sequence parallelism: bands of rows as in sync_patch (halo rows for convolutions,
GroupNorm statistics), but self-attention re-shards from tokens to heads with two all-to-alls
instead of gathering every band's keys and values (strategies/patch/ulysses.py). Exact.
For UNets and diffusion transformers alike; the heads of every self-attention must divide by
the number of bands."""

from __future__ import annotations

from math import gcd

from omegaconf import DictConfig

from paraflow.errors import ParaflowError
from paraflow.families.base import attention_heads, self_attention_modules
from paraflow.strategies.patch.strategy import PatchParallel
from paraflow.strategies.patch.ulysses import UlyssesAttnProcessor


class Ulysses(PatchParallel):
    name = "ulysses"
    attention_processor = UlyssesAttnProcessor

    def __init__(self, cfg_split: bool = False, data_degree: int = 1,
                 shard_weights: bool = False) -> None:
        super().__init__(cfg_split=cfg_split, data_degree=data_degree,
                         shard_weights=shard_weights)

    def validate(self, cfg: DictConfig) -> None:
        """The patch checks, then the heads of every self-attention against the band count,
        on the denoiser built on the meta device."""
        from paraflow.models.skeleton import denoiser_skeleton

        super().validate(cfg)
        skeleton = denoiser_skeleton(cfg.model)
        bands = max(self.band_count(cfg), 1)
        if skeleton is None or bands == 1:
            return
        heads = {h for _, m in self_attention_modules(skeleton)
                 if (h := attention_heads(m)) is not None}
        common = 0
        for h in heads:
            common = gcd(common, h)
        if common % bands:
            works = [d for d in range(2, common + 1) if common % d == 0]
            raise ParaflowError(
                f"strategy=ulysses over {bands} bands: the model's self-attention heads "
                f"({', '.join(map(str, sorted(heads)))}) do not divide by {bands}; band counts "
                f"that work: {', '.join(map(str, works)) or 'none (one band)'}")
