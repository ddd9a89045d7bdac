from __future__ import annotations

import copy
from typing import Any

import torch
from tqdm.auto import tqdm

from paraflow.adapters import Conditioning, denoiser_forward, uses_guidance
from paraflow.errors import ParaflowError
from paraflow.graph import StageEnv


def check_finite(latents: torch.Tensor, step: int, env: StageEnv) -> None:
    """Fail with the step and the mode instead of writing a black image."""
    if not bool(torch.isfinite(latents).all()):
        mode = getattr(env.strategy, "mode", env.strategy.name)
        raise ParaflowError(f"NaN/inf in the latents after denoising step {step} of "
                            f"{env.cfg.steps} (strategy {mode}, {env.cfg.height}x{env.cfg.width},"
                            f" {env.ctx.world_size} rank(s)); nothing was written")


class Denoise:
    """The sampling loop: scheduler steps, classifier-free guidance, a per-step strategy hook."""

    components = ("unet",)

    def __call__(self, env: StageEnv, initial_latents: torch.Tensor,
                 conditioning: Conditioning) -> dict[str, Any]:
        cfg, comm = env.cfg, env.ctx.comm
        unet = env.pipe.unet
        scheduler = copy.deepcopy(env.pipe.scheduler)  # it keeps per-run state (step index)
        scheduler.set_timesteps(cfg.steps, device=env.device)
        guidance = uses_guidance(env.pipe, cfg.guidance_scale)
        cond = conditioning.to(env.device, env.dtype)
        latents = initial_latents.float() * scheduler.init_noise_sigma
        show = cfg.pipeline.progress and env.ctx.is_main
        trajectory = []
        for step, t in enumerate(tqdm(scheduler.timesteps, disable=not show, desc="denoise")):
            comm.step = step
            env.strategy.on_step(step, env.ctx)
            model_input = torch.cat([latents] * 2) if guidance else latents
            model_input = scheduler.scale_model_input(model_input, t)
            noise = denoiser_forward(unet, model_input.to(env.dtype), t, cond).float()
            if guidance:
                uncond, text = noise.chunk(2)
                noise = uncond + cfg.guidance_scale * (text - uncond)
            latents = scheduler.step(noise, t, latents, return_dict=False)[0]
            check_finite(latents, step, env)
            if cfg.save_trajectory:
                trajectory.append(latents.cpu())
        comm.step = None
        finish = getattr(env.strategy, "on_denoise_end", None)  # optional: free per-run buffers
        if callable(finish):
            finish(env.ctx)
        env.trajectory = torch.stack(trajectory, dim=1) if trajectory else None
        return {"latents": latents}
