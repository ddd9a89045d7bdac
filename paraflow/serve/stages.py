"""The stages a service swaps into the run's stage graph (by `_target_`, as any pipeline config
may): prompt encoding through the embedding cache (embeddings.py), and initial noise from a seed
per image, so that requests with their own seeds run as one batch."""

from __future__ import annotations

from hydra.utils import get_class
from omegaconf import DictConfig, open_dict

from paraflow.graph import StageEnv
from paraflow.serve.embeddings import CachedEncodePrompt
from paraflow.stages.encode import EncodePrompt
from paraflow.stages.latents import PrepareLatents

SEEDS = "seeds"  # StageEnv.services: image id -> the seed of its noise


class SeededPrepareLatents(PrepareLatents):
    """PrepareLatents with each image's seed from StageEnv.services['seeds'] (the batched
    requests' own), else seed + id as in a run: the same noise either way."""

    def seeds(self, env: StageEnv, image_ids: list[int]) -> list[int]:
        seeds: dict[int, int] | None = env.services.get(SEEDS)
        if seeds is None:
            return super().seeds(env, image_ids)
        return [seeds[i] for i in image_ids]


SWAPS: dict[type, type] = {EncodePrompt: CachedEncodePrompt, PrepareLatents: SeededPrepareLatents}


def serving_stages(cfg: DictConfig) -> None:
    """In place: the run's stages of the swapped kinds become the service's."""
    with open_dict(cfg):
        for spec in cfg.pipeline.stages.values():
            found: type = get_class(spec._target_)
            swap = SWAPS.get(found)
            if swap is not None:
                spec._target_ = f"{swap.__module__}.{swap.__name__}"
