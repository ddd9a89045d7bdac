from __future__ import annotations

from typing import Any

import torch

from paraflow.adapters import latent_channels, latent_downsampling
from paraflow.graph import StageEnv


class PrepareLatents:
    """Initial noise. Image i draws from a CPU generator seeded `seed + i`, so an image does not
    depend on which rank makes it or what it is batched with (diffusers, given the same list of
    generators, draws the same noise)."""

    components = ()

    def __call__(self, env: StageEnv, image_ids: list[int]) -> dict[str, Any]:
        cfg, factor = env.cfg, latent_downsampling(env.pipe)
        shape = (1, latent_channels(env.pipe), cfg.height // factor, cfg.width // factor)
        noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))
                 for seed in self.seeds(env, image_ids)]
        return {"initial_latents": torch.cat(noise).to(env.device)}

    def seeds(self, env: StageEnv, image_ids: list[int]) -> list[int]:
        """The seed of each image's noise: the run's seed + the image's index."""
        return [env.cfg.seed + i for i in image_ids]
