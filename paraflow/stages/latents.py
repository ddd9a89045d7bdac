from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig

from paraflow.errors import ParaflowError
from paraflow.families import latent_shape
from paraflow.graph import StageEnv
from paraflow.models.configured import configured_family
from paraflow.stages.schedule import first_step, from_strength, full_schedule, run_strength

SEEDS = "seeds"  # StageEnv.services: image id -> the seed of its noise (a service's requests)


def image_seeds(env: StageEnv, image_ids: list[int]) -> list[int]:
    """The seed of each image: a service's per-request seed, else the run's seed + the image's
    index, so an image does not depend on which rank makes it or what it is batched with."""
    seeds: dict[int, int] | None = env.services.get(SEEDS)
    if seeds is not None:
        return [seeds[i] for i in image_ids]
    return [int(env.cfg.seed) + i for i in image_ids]


def image_generators(env: StageEnv, image_ids: list[int]) -> list[torch.Generator]:
    """One CPU generator per image (diffusers, given the same list of generators, draws the
    same numbers in the same order)."""
    return [torch.Generator("cpu").manual_seed(s) for s in image_seeds(env, image_ids)]


def draw(generators: list[torch.Generator], shape: tuple[int, ...],
         device: torch.device) -> torch.Tensor:
    """(len(generators), *shape) normal noise, image i from generator i."""
    noise = [torch.randn((1, *shape), generator=g) for g in generators]
    return torch.cat(noise).to(device)


class PrepareLatents:
    """Initial noise, image i from its own generator (image_generators)."""

    components = ()

    def __call__(self, env: StageEnv, image_ids: list[int]) -> dict[str, Any]:
        shape = latent_shape(env.pipe, int(env.cfg.height), int(env.cfg.width))
        return {"initial_latents": draw(image_generators(env, image_ids), shape, env.device)}


class NoiseImageLatents:
    """img2img: the encoded image noised to the step where `strength` starts the schedule, with
    noise from each image's generator after the VAE's sample (as diffusers draws it); a flow
    matching scheduler mixes image and noise at the first step's sigma (scale_noise)."""

    components = ()

    @staticmethod
    def check(cfg: DictConfig, spec: Any) -> None:
        strength = run_strength(cfg, spec)
        if not 0 < strength <= 1:
            raise ParaflowError(f"strength={strength}: must be in (0, 1] (1 noises the image "
                                "fully; smaller keeps more of it)")
        family = configured_family(cfg.model)
        flow = family is not None and family.flow_matching
        if first_step(int(cfg.steps), strength, flow) >= int(cfg.steps):
            raise ParaflowError(f"strength={strength} with steps={cfg.steps} runs no step: "
                                f"use strength >= {1 / int(cfg.steps):.3g} or more steps")

    def __call__(self, env: StageEnv, image_latents: torch.Tensor,
                 generators: list[torch.Generator]) -> dict[str, Any]:
        strength = run_strength(env.cfg, env.spec)
        schedule = from_strength(full_schedule(env, image_latents.shape), strength)
        noise = draw(generators, tuple(image_latents.shape[1:]), env.device)
        first = schedule.first.repeat(image_latents.shape[0])
        scheduler = schedule.scheduler
        if hasattr(scheduler, "add_noise"):
            noised = scheduler.add_noise(image_latents.float(), noise, first)
        else:  # flow matching (SD3, Flux)
            noised = scheduler.scale_noise(image_latents.float(), first, noise)
        return {"initial_latents": noised, "schedule": schedule}
