from __future__ import annotations

from typing import Any

import torch

from paraflow.adapters import latents_to_vae_input
from paraflow.config import StageParallel
from paraflow.graph import StageEnv


class Decode:
    """Final latents → pixels in [-1, 1] with the VAE decoder. With `parallel=patch` (patch
    strategies: every rank holds the same latents) each rank decodes one band of rows; `auto`
    (the default) does that under a patch strategy."""

    components = ("vae",)

    def __call__(self, env: StageEnv, latents: torch.Tensor) -> dict[str, Any]:
        vae = env.pipe.vae
        scaled = latents_to_vae_input(vae, latents.to(env.device, env.dtype))
        parallel = StageParallel(getattr(env.spec, "parallel", StageParallel.none))
        # The ranks holding the same image: a data replica in hybrid layouts, else all.
        comm = getattr(env.strategy, "image_comm", None) or env.ctx.comm
        if parallel is StageParallel.auto:
            shared = getattr(env.strategy, "replicated_latents", False)
            parallel = StageParallel.patch if shared else StageParallel.none
        if parallel is StageParallel.patch and comm.world_size > 1:
            from paraflow.strategies.patch.vae import patch_decode

            pixels = patch_decode(vae, scaled, comm)
        else:
            pixels = vae.decode(scaled, return_dict=False)[0]
        return {"pixels": pixels.float()}
