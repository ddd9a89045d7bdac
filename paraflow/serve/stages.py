"""The stages a service swaps into the run's stage graph (by `_target_`, as any pipeline config
may): prompt encoding through the embedding cache (embeddings.py). Requests with their own seeds
run as one batch through StageEnv.services['seeds'], which every noise-drawing stage reads
(paraflow/stages/latents.py)."""

from __future__ import annotations

from hydra.utils import get_class
from omegaconf import DictConfig, open_dict

from paraflow.serve.embeddings import CachedEncodePrompt
from paraflow.stages.encode import EncodePrompt
from paraflow.stages.latents import SEEDS

__all__ = ["SEEDS", "SWAPS", "serving_stages"]

SWAPS: dict[type, type] = {EncodePrompt: CachedEncodePrompt}


def serving_stages(cfg: DictConfig) -> None:
    """In place: the run's stages of the swapped kinds become the service's."""
    with open_dict(cfg):
        for spec in cfg.pipeline.stages.values():
            found: type = get_class(spec._target_)
            swap = SWAPS.get(found)
            if swap is not None:
                spec._target_ = f"{swap.__module__}.{swap.__name__}"
