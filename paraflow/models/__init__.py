"""Model loading: a config's `_target_` builds (tiny) or loads (pretrained) a diffusers pipeline,
and the `scheduler` group swaps its scheduler class while keeping the model's schedule."""

from __future__ import annotations

from typing import Any

from hydra.utils import get_class, get_method
from omegaconf import DictConfig, OmegaConf


def load_pipeline(model_cfg: DictConfig, scheduler_cfg: DictConfig | None = None) -> Any:
    options = OmegaConf.to_container(model_cfg, resolve=True, enum_to_str=True)
    assert isinstance(options, dict)
    build = get_method(options.pop("_target_"))
    options.pop("name", None)
    pipe = build(**options)
    if scheduler_cfg is not None:
        scheduler_class = get_class(scheduler_cfg._target_)
        extra = OmegaConf.to_container(scheduler_cfg.options, resolve=True)
        assert isinstance(extra, dict)
        pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe
