from __future__ import annotations

from typing import Any

import torch

from paraflow.config import StageParallel
from paraflow.graph import StageEnv
from paraflow.plugin import banded_vae
from paraflow.vae import latents_to_vae_input


class Decode:
    """Final latents → pixels in [-1, 1] with the VAE decoder. With `parallel=patch` (a
    strategy whose ranks hold the same latents) each rank decodes one band of rows (the
    strategy's decode_in_bands); `auto` (the default) does that whenever the strategy allows."""

    components = ("vae",)
    compiles = True  # pipeline.stages.NAME.compile (paraflow/compile.py)

    def __call__(self, env: StageEnv, latents: torch.Tensor) -> dict[str, Any]:
        vae = env.pipe.vae
        scaled = latents_to_vae_input(vae, latents.to(env.device, env.dtype))
        banded = banded_vae(env.strategy)
        if banded is not None and in_bands(env):
            pixels = banded.decode_in_bands(vae, scaled, env.ctx)
        else:
            pixels = vae.decode(scaled, return_dict=False)[0]
        return {"pixels": pixels.float()}


def in_bands(env: StageEnv) -> bool:
    """Whether the running stage splits its VAE work in bands: `parallel=patch`, or `auto`
    under a strategy whose ranks hold the same latents, over more than one rank."""
    parallel = StageParallel(getattr(env.spec, "parallel", StageParallel.none))
    if parallel is StageParallel.auto:
        shared = env.strategy.replicated_latents
        parallel = StageParallel.patch if shared else StageParallel.none
    banded = banded_vae(env.strategy)
    return (parallel is StageParallel.patch and banded is not None
            and banded.image_comm(env.ctx).world_size > 1)
