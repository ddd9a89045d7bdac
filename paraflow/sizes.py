"""The size a run generates at: the asked height × width, or — with resolution binning, as
diffusers' PixArt pipelines do by default — the nearest aspect-ratio bin the model was trained at,
whose images are then resized and centre-cropped to the asked size (stages/save.py)."""

from __future__ import annotations

from diffusers.image_processor import PixArtImageProcessor
from omegaconf import DictConfig, open_dict

from paraflow.models.configured import configured_denoiser, configured_family


def with_binned_size(cfg: DictConfig) -> DictConfig:
    """`cfg` with height and width set to the bin it generates at and `output_size` to the asked
    [height, width], when its family bins this model and the bin differs; else `cfg` itself.
    Idempotent: a config already binned is returned as it is."""
    if not cfg.get("resolution_binning") or cfg.get("output_size") is not None:
        return cfg
    family = configured_family(cfg.model)
    bins = None if family is None else family.resolution_bins(configured_denoiser(cfg.model))
    if bins is None:
        return cfg
    height, width = int(cfg.height), int(cfg.width)
    binned = PixArtImageProcessor.classify_height_width_bin(height, width, ratios=bins)
    if tuple(binned) == (height, width):
        return cfg
    out = cfg.copy()
    with open_dict(out):
        out.output_size = [height, width]
        out.height, out.width = int(binned[0]), int(binned[1])
    return out


def output_size(cfg: DictConfig) -> tuple[int, int]:
    """The (height, width) of the images a run writes."""
    size = cfg.get("output_size")
    return (int(cfg.height), int(cfg.width)) if size is None else (int(size[0]), int(size[1]))
