from __future__ import annotations

from typing import Any

import torch

from paraflow.adapters import latents_to_vae_input
from paraflow.graph import StageEnv


class Decode:
    """Final latents → pixels in [-1, 1] with the VAE decoder."""

    components = ("vae",)

    def __call__(self, env: StageEnv, latents: torch.Tensor) -> dict[str, Any]:
        vae = env.pipe.vae
        scaled = latents_to_vae_input(vae, latents.to(env.device, env.dtype))
        pixels = vae.decode(scaled, return_dict=False)[0]
        return {"pixels": pixels.float()}
