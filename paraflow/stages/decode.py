from __future__ import annotations

from typing import Any

import torch

from paraflow.adapters import latents_to_vae_input
from paraflow.config import StageParallel
from paraflow.graph import StageEnv


class Decode:
    """Final latents → pixels in [-1, 1] with the VAE decoder. With `parallel=patch` (a
    strategy whose ranks hold the same latents) each rank decodes one band of rows (the
    strategy's decode_in_bands); `auto` (the default) does that whenever the strategy allows."""

    components = ("vae",)

    def __call__(self, env: StageEnv, latents: torch.Tensor) -> dict[str, Any]:
        vae = env.pipe.vae
        scaled = latents_to_vae_input(vae, latents.to(env.device, env.dtype))
        parallel = StageParallel(getattr(env.spec, "parallel", StageParallel.none))
        strategy = env.strategy
        if parallel is StageParallel.auto:
            shared = strategy.replicated_latents
            parallel = StageParallel.patch if shared else StageParallel.none
        if parallel is StageParallel.patch and strategy.image_comm(env.ctx).world_size > 1:
            pixels = strategy.decode_in_bands(vae, scaled, env.ctx)
        else:
            pixels = vae.decode(scaled, return_dict=False)[0]
        return {"pixels": pixels.float()}
