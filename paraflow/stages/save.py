from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor

from paraflow.families import denoiser_call
from paraflow.graph import StageEnv


def pixels_to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW pixels to uint8 NHWC, rounded as diffusers rounds when it makes PIL images."""
    images = VaeImageProcessor().postprocess(pixels.float(), output_type="np")
    return (images * 255).round().astype(np.uint8)


class Save:
    """Pixels → uint8 images handed to the run's output sink (rank 0 writes them at the end,
    after the strategy gathers every rank's images)."""

    components = ()

    def __call__(self, env: StageEnv, pixels: torch.Tensor, latents: torch.Tensor,
                 image_ids: list[int]) -> dict[str, Any]:
        keep_latents = latents.float().cpu() if env.cfg.save_latents else None
        if env.cfg.save_trajectory and env.trajectory is not None:
            keep_latents = env.trajectory.float()  # every step's; the last is `latents`
        if env.cfg.get("output_size") is not None:  # generated at a bin (paraflow/sizes.py)
            height, width = env.cfg.output_size
            pixels = denoiser_call(env.pipe).family.resize_from_bin(pixels, height, width)
        env.sink.add(image_ids, pixels_to_uint8(pixels), keep_latents)
        return {"saved": list(image_ids)}
