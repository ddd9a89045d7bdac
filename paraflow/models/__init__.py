"""Model loading: a config's `_target_` builds (tiny) or loads (pretrained) a diffusers pipeline,
and the `scheduler` group swaps its scheduler class while keeping the model's schedule."""

from __future__ import annotations

from typing import Any

from hydra.utils import get_class, get_method
from omegaconf import DictConfig

from paraflow.config import plain_dict


def load_pipeline(model_cfg: DictConfig, scheduler_cfg: DictConfig | None = None) -> Any:
    options = plain_dict(model_cfg)
    build = get_method(options.pop("_target_"))
    options.pop("name", None)
    pipe = build(**options)
    if scheduler_cfg is not None:
        scheduler_class: Any = get_class(scheduler_cfg._target_)
        extra = plain_dict(scheduler_cfg.options)
        pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def denoiser_skeleton(model_cfg: DictConfig) -> Any:
    """The denoiser's module tree on the meta device (no weights, no memory), from config alone,
    so a layout can be checked before any rank starts. None when only loading would tell (hub ids
    not in the cache, folders without unet/config.json). See paraflow/models/skeleton.py for the
    other modules."""
    from paraflow.models.skeleton import component_skeleton, denoiser_component

    return component_skeleton(model_cfg, denoiser_component(model_cfg))
