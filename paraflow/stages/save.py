from __future__ import annotations

from typing import Any

import torch

from paraflow.adapters import pixels_to_uint8
from paraflow.graph import StageEnv


class Save:
    """Pixels → uint8 images handed to the run's output sink (rank 0 writes them at the end,
    after the strategy gathers every rank's images)."""

    components = ()

    def __call__(self, env: StageEnv, pixels: torch.Tensor, latents: torch.Tensor,
                 image_ids: list[int]) -> dict[str, Any]:
        keep_latents = latents.float().cpu() if env.cfg.save_latents else None
        if env.cfg.save_trajectory and env.trajectory is not None:
            keep_latents = env.trajectory.float()  # every step's; the last is `latents`
        env.sink.add(image_ids, pixels_to_uint8(pixels), keep_latents)
        return {"saved": list(image_ids)}
