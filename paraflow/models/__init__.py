"""Model loading: a config's `_target_` builds (tiny) or loads (pretrained) a diffusers pipeline,
and the `scheduler` group swaps its scheduler class while keeping the model's schedule."""

from __future__ import annotations

import logging
from typing import Any

from hydra.utils import get_class, get_method
from omegaconf import DictConfig

from paraflow.config import build_options, plain_dict
from paraflow.models.components import alias_flattened_clip

log = logging.getLogger(__name__)


def load_pipeline(model_cfg: DictConfig, scheduler_cfg: DictConfig | None = None) -> Any:
    target, options = build_options(model_cfg)
    pipe = get_method(target)(**options)
    if scheduler_cfg is not None:
        pipe.scheduler = scheduler_for(pipe.scheduler, scheduler_cfg)
    pipe.set_progress_bar_config(disable=True)
    from paraflow.models.lora import apply_loras

    return apply_loras(alias_flattened_clip(pipe), model_cfg)


def scheduler_for(own: Any, spec: DictConfig) -> Any:
    """`spec`'s scheduler class on the model's own scheduler config. A flow-matching model
    (SD3, Flux) keeps its own scheduler when `spec` is a noise-prediction one (the default
    `ddim` included), and the other way round: the two kinds do not share schedules."""
    scheduler_class: Any = get_class(spec._target_)
    if is_flow_matching(scheduler_class) != is_flow_matching(type(own)):
        report = log.info if spec.name == "ddim" else log.warning  # ddim: the default
        report("scheduler=%s does not fit this model's %s; keeping the model's own",
               spec.name, type(own).__name__)
        return own
    return scheduler_class.from_config(own.config, **plain_dict(spec.options))


def is_flow_matching(scheduler_class: type) -> bool:
    """A scheduler of flow-matching models (velocity prediction, sigmas from 1 to 0)."""
    return scheduler_class.__name__.startswith("FlowMatch")

