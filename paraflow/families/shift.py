"""The flow-matching schedule's shift by the image's token count, as the SD3 and Flux pipelines
compute it where the scheduler uses dynamic shifting."""

from __future__ import annotations

from typing import Any

from diffusers.pipelines.flux.pipeline_flux import calculate_shift


def resolution_shift(scheduler: Any, tokens: int, max_shift: float) -> dict[str, float]:
    """`set_timesteps`' `mu` for `tokens` image tokens; nothing when the scheduler does not
    shift dynamically. `max_shift`: the pipeline's default when the scheduler names none."""
    config = scheduler.config
    if not config.get("use_dynamic_shifting"):
        return {}
    return {"mu": calculate_shift(
        tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5), config.get("max_shift", max_shift))}
