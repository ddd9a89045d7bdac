from __future__ import annotations

from typing import Any

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from tqdm.auto import tqdm

from paraflow.adapters import (
    Conditioning,
    denoiser,
    denoiser_forward,
    uses_guidance,
    with_embedded_guidance,
)
from paraflow.errors import ParaflowError, set_stage
from paraflow.graph import StageEnv
from paraflow.stages.inpaint import InpaintCondition
from paraflow.stages.schedule import Schedule, ending_at, full_schedule, handover, starting_at

# The finiteness of the latents is recorded on the device every step (no host sync, so a GPU's
# stream and a strategy's asynchronous exchange are not stalled) and read on the host every
# CHECK_EVERY steps and after the last one.
CHECK_EVERY = 10


def check_finite(finite: torch.Tensor, start: int, stop: int, env: StageEnv) -> None:
    """`finite[i]`: whether the latents after step i were finite. Read steps start..stop-1 (one
    host sync) and fail naming the first bad step and the mode, instead of writing a black
    image."""
    window = finite[start:stop]
    if bool(window.all()):
        return
    first = start + int((~window).nonzero()[0, 0])
    mode = env.strategy.mode
    raise ParaflowError(f"NaN/inf in the latents after denoising step {first + 1} of "
                        f"{env.cfg.steps} (strategy {mode}, {env.cfg.height}x{env.cfg.width},"
                        f" {env.ctx.world_size} rank(s)); nothing was written")


class Denoise:
    """The sampling loop: scheduler steps, classifier-free guidance (rescaled by the run's
    guidance_rescale), a per-step strategy hook. Without a `schedule` input it runs every step
    from unit noise; with one (img2img, inpaint) the steps it names, from noised latents. Step
    0 is the first step run, so a strategy's warm-up counts from there. An `inpaint` input
    extends each step's denoiser input or blends the kept region back after it. Options
    `denoising_end` / `denoising_start` cut the schedule where a base hands over to a refiner
    (pipeline=sdxl_refine)."""

    components = ("unet", "transformer")

    def __call__(self, env: StageEnv, initial_latents: torch.Tensor, conditioning: Conditioning,
                 schedule: Schedule | None = None,
                 inpaint: InpaintCondition | None = None) -> dict[str, Any]:
        set_stage("denoise")
        cfg, comm = env.cfg, env.ctx.comm
        model = denoiser(env.pipe)
        schedule = schedule or full_schedule(env, initial_latents.shape)
        start = handover(cfg, env.spec, "denoising_start")
        if start is not None:  # continues another stage's latents (a refiner)
            schedule = starting_at(schedule, start)
        end = handover(cfg, env.spec, "denoising_end")
        if end is not None:  # hands its latents, still noisy, to another stage
            schedule = ending_at(schedule, end)
        scheduler = schedule.scheduler
        guidance = uses_guidance(env.pipe, cfg.guidance_scale)
        rescale = float(cfg.get("guidance_rescale") or 0.0)
        cond = with_embedded_guidance(model, conditioning.to(env.device, env.dtype),
                                      cfg.guidance_scale, initial_latents.shape[0])
        # Unit noise starts at the scheduler's initial sigma (flow matching: 1).
        sigma = 1.0 if schedule.noised else getattr(scheduler, "init_noise_sigma", 1.0)
        latents = initial_latents.to(env.device).float() * sigma
        extra = inpaint.extra_input(guidance) if inpaint is not None else None
        show = cfg.pipeline.progress and env.ctx.is_main
        trajectory = []
        steps = len(schedule.timesteps)
        finite = torch.ones(steps, dtype=torch.bool, device=latents.device)
        checked = 0  # steps before this one have been read on the host
        for step, t in enumerate(tqdm(schedule.timesteps, disable=not show, desc="denoise")):
            set_stage("denoise", step + 1, steps)  # for a failure report, if this rank dies
            comm.step = step
            env.strategy.on_step(step, env.ctx)
            model_input = torch.cat([latents] * 2) if guidance else latents
            if hasattr(scheduler, "scale_model_input"):  # flow matching has none
                model_input = scheduler.scale_model_input(model_input, t)
            if extra is not None:  # an inpainting UNet's mask and masked-image channels
                model_input = torch.cat([model_input, extra.to(model_input.dtype)], dim=1)
            noise = denoiser_forward(model, model_input.to(env.dtype), t, cond).float()
            if guidance:
                uncond, text = noise.chunk(2)
                noise = uncond + cfg.guidance_scale * (text - uncond)
                if rescale > 0:
                    noise = rescale_noise_cfg(noise, text, guidance_rescale=rescale)
            latents = scheduler.step(noise, t, latents, return_dict=False)[0]
            if inpaint is not None:
                latents = inpaint.after_step(latents, step, schedule)
            finite[step] = torch.isfinite(latents).all()  # on the device, no sync
            if step + 1 - checked >= CHECK_EVERY:
                check_finite(finite, checked, step + 1, env)
                checked = step + 1
            if cfg.save_trajectory:
                trajectory.append(latents.cpu())
            if env.on_step is not None:
                env.on_step(step + 1, steps)
        check_finite(finite, checked, steps, env)
        set_stage("after denoise")
        comm.step = None
        env.strategy.on_denoise_end(env.ctx)  # e.g. free per-run buffers before decode
        env.trajectory = torch.stack(trajectory, dim=1) if trajectory else None
        return {"latents": latents}
