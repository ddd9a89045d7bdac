"""Inpainting: the image is repainted where its mask is white and kept where it is black. Two
methods, chosen by the UNet as diffusers chooses them: an inpainting UNet (9 input channels)
reads the mask and the masked image's latents beside the latents at every step; an ordinary
UNet denoises the whole image and, after each step, the kept region is put back as the input
image noised to the next step (the masked blend)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from paraflow.errors import ParaflowError
from paraflow.families import denoiser_call
from paraflow.graph import StageEnv
from paraflow.models.configured import configured_family
from paraflow.stages.image import encode_sample
from paraflow.stages.latents import NoiseImageLatents, draw, image_generators
from paraflow.stages.schedule import Schedule, from_strength, full_schedule, run_strength


@dataclass
class InpaintCondition:
    """What the denoise stage adds to each step: the latent-size mask (1: repaint) and either
    the masked image's latents (`concat`, for an inpainting UNet) or the image's latents and
    the noise that re-noises them (the blend, for an ordinary UNet)."""

    mask: torch.Tensor
    masked_latents: torch.Tensor | None = None
    image_latents: torch.Tensor | None = None
    noise: torch.Tensor | None = None

    def extra_input(self, guidance: bool) -> torch.Tensor | None:
        """The channels an inpainting UNet reads beside the latents (the mask, the masked
        image's latents), doubled for guidance's two branches; made once per denoise stage,
        not every step. None for the blend."""
        if self.masked_latents is None:
            return None
        copies = 2 if guidance else 1
        return torch.cat([self.mask, self.masked_latents], dim=1).repeat(copies, 1, 1, 1)

    def after_step(self, latents: torch.Tensor, step: int, schedule: Schedule) -> torch.Tensor:
        """The blend: outside the mask, the image noised to the next step's level."""
        if self.image_latents is None or self.noise is None:
            return latents
        kept = self.image_latents
        if step + 1 < len(schedule.timesteps):
            following = schedule.timesteps[step + 1:step + 2]
            kept = schedule.scheduler.add_noise(kept, self.noise, following)
        return (1 - self.mask) * kept + self.mask * latents


class PrepareInpaint:
    """image + mask → the initial latents, the schedule `strength` starts, and the inpainting
    condition. Each image's generator draws in diffusers' order: the image's VAE sample (when
    the blend needs it or strength < 1), the noise, the masked image's VAE sample."""

    components = ("vae",)
    compiles = True  # pipeline.stages.NAME.compile (paraflow/compile.py)

    @staticmethod
    def check(cfg: DictConfig, spec: Any) -> None:
        family = configured_family(cfg.model)
        if family is not None and not family.can_inpaint:
            raise ParaflowError(f"pipeline={cfg.pipeline.name} needs a model whose family "
                                f"inpaints (a UNet: SD 1.x/2.x, SDXL); model {cfg.model.name} "
                                f"is a {family.name} model")
        NoiseImageLatents.check(cfg, spec)

    def __call__(self, env: StageEnv, image: torch.Tensor, mask: torch.Tensor,
                 image_ids: list[int]) -> dict[str, Any]:
        strength = run_strength(env.cfg, env.spec)
        generators = image_generators(env, image_ids)
        call = denoiser_call(env.pipe)
        concat = call.family.inpainting(call.model.config)
        full = strength == 1.0  # pure noise: the image's latents are not needed to start
        image_latents = None if concat and full else encode_sample(env, image, generators)
        latent_size = (image.shape[-2] // env.pipe.vae_scale_factor,
                       image.shape[-1] // env.pipe.vae_scale_factor)
        noise = draw(generators, (env.pipe.vae.config.latent_channels, *latent_size), env.device)
        schedule = from_strength(full_schedule(env, noise.shape), strength)
        if full:  # unit noise, scaled by the scheduler's initial sigma in the denoise stage
            initial, schedule.noised = noise, False
        else:
            assert image_latents is not None
            first = schedule.first.repeat(noise.shape[0])
            initial = schedule.scheduler.add_noise(image_latents, noise, first)
        masked = encode_sample(env, image * (mask < 0.5), generators)
        small_mask = F.interpolate(mask, size=latent_size).to(env.device)
        condition = (InpaintCondition(small_mask, masked_latents=masked) if concat else
                     InpaintCondition(small_mask, image_latents=image_latents, noise=noise))
        return {"initial_latents": initial, "schedule": schedule, "inpaint": condition}
