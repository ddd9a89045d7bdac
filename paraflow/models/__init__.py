"""Model loading: a config's `_target_` builds (tiny) or loads (pretrained) a diffusers pipeline,
and the `scheduler` group swaps its scheduler class while keeping the model's schedule."""

from __future__ import annotations

from typing import Any

from hydra.utils import get_class, get_method
from omegaconf import DictConfig, OmegaConf

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
    so a layout can be checked before any rank starts. None when only loading would tell (hub ids,
    folders without unet/config.json)."""
    import json
    from pathlib import Path

    import diffusers
    import torch

    from paraflow.models.pretrained import looks_like_hub_id

    if "unet" in model_cfg:  # built from config (tiny models)
        config = OmegaConf.to_container(model_cfg.unet, resolve=True)
        cls: Any = diffusers.UNet2DConditionModel
    else:
        path = str(model_cfg.get("path", ""))
        file = Path(path).expanduser() / "unet" / "config.json"
        if not path or looks_like_hub_id(path) or not file.is_file():
            return None
        config = json.loads(file.read_text())
        cls = getattr(diffusers, str(config.get("_class_name")), diffusers.UNet2DConditionModel)
    with torch.device("meta"):
        return cls.from_config(config)
