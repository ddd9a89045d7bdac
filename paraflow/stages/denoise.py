"""The denoise stage: the run's schedule, conditioning and hooks around the one loop
(paraflow/loop.py)."""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from paraflow.cache import cache_kind, cache_options
from paraflow.cache.step import CallCount, StepCache
from paraflow.errors import ParaflowError, set_stage
from paraflow.families import Conditioning, denoiser_call
from paraflow.graph import StageEnv
from paraflow.loop import LoopHook, Sampling, Step, denoise
from paraflow.plugin import image_ranks
from paraflow.stages.inpaint import InpaintCondition
from paraflow.stages.schedule import Schedule, ending_at, full_schedule, handover, starting_at

# The finiteness of the latents is recorded on the device every step (no host sync, so a GPU's
# stream and a strategy's asynchronous exchange are not stalled) and read on the host every
# CHECK_EVERY steps and after the last one.
CHECK_EVERY = 10


class StrategySteps(LoopHook):
    """The strategy's per-step hook and end of denoising; the step named for failure reports
    and the communicator's per-step byte counts."""

    def __init__(self, env: StageEnv) -> None:
        self.env = env

    def before_step(self, step: Step) -> None:
        set_stage("denoise", step.index + 1, step.count)  # for a failure report
        self.env.ctx.comm.step = step.index
        self.env.strategy.on_step(step.index, self.env.ctx)

    def end(self) -> None:
        set_stage("after denoise")
        self.env.ctx.comm.step = None
        self.env.strategy.on_denoise_end(self.env.ctx)  # e.g. free per-run buffers


class Blend(LoopHook):
    """Inpainting with an ordinary UNet: the kept region put back after each step."""

    def __init__(self, inpaint: InpaintCondition, schedule: Schedule) -> None:
        self.inpaint, self.schedule = inpaint, schedule

    def after_step(self, step: Step, latents: torch.Tensor) -> torch.Tensor:
        return self.inpaint.after_step(latents, step.index, self.schedule)


class FiniteCheck(LoopHook):
    """Fail naming the first step whose latents hold NaN/inf, instead of writing a black image
    (recorded on the device, read every CHECK_EVERY steps)."""

    def __init__(self, env: StageEnv, steps: int, device: torch.device) -> None:
        self.env, self.checked = env, 0
        self.finite = torch.ones(steps, dtype=torch.bool, device=device)

    def after_step(self, step: Step, latents: torch.Tensor) -> torch.Tensor:
        self.finite[step.index] = torch.isfinite(latents).all()  # on the device, no sync
        if step.index + 1 - self.checked >= CHECK_EVERY:
            self.check(step.index + 1)
        return latents

    def end(self) -> None:
        self.check(len(self.finite))

    def check(self, stop: int) -> None:
        window = self.finite[self.checked:stop]
        if not bool(window.all()):
            first = self.checked + int((~window).nonzero()[0, 0])
            env = self.env
            raise ParaflowError(f"NaN/inf in the latents after denoising step {first + 1} of "
                                f"{env.cfg.steps} (strategy {env.strategy.mode}, "
                                f"{env.cfg.height}x{env.cfg.width}, {env.ctx.world_size} "
                                "rank(s)); nothing was written")
        self.checked = stop


class Trajectory(LoopHook):
    """Every step's latents, on the host (save_trajectory)."""

    def __init__(self) -> None:
        self.kept: list[torch.Tensor] = []

    def after_step(self, step: Step, latents: torch.Tensor) -> torch.Tensor:
        self.kept.append(latents.cpu())
        return latents


class Progress(LoopHook):
    """A progress bar on the main rank, and the host application's per-step callback
    (raising from it stops the run: a service's cancellation)."""

    def __init__(self, env: StageEnv, steps: int) -> None:
        self.env = env
        self.bar = tqdm(total=steps, desc="denoise",
                        disable=not (env.cfg.pipeline.progress and env.ctx.is_main))

    def after_step(self, step: Step, latents: torch.Tensor) -> torch.Tensor:
        self.bar.update()
        if self.env.on_step is not None:
            self.env.on_step(step.index + 1, step.count)
        return latents

    def end(self) -> None:
        self.bar.close()


class Denoise:
    """The sampling loop over the run's schedule: without a `schedule` input every step from
    unit noise; with one (img2img, inpaint) the steps it names, from noised latents. Step 0 is
    the first step run, so a strategy's warm-up counts from there. An `inpaint` input extends
    each step's denoiser input or blends the kept region back after it. Options
    `denoising_end` / `denoising_start` cut the schedule where a base hands over to a refiner
    (pipeline=sdxl_refine)."""

    components = ("unet", "transformer")
    caches = True  # takes a step cache (pipeline.stages.NAME.cache: paraflow/cache)
    compiles = True  # pipeline.stages.NAME.compile (paraflow/compile.py)

    def __call__(self, env: StageEnv, initial_latents: torch.Tensor, conditioning: Conditioning,
                 schedule: Schedule | None = None,
                 inpaint: InpaintCondition | None = None) -> dict[str, Any]:
        set_stage("denoise")
        cfg = env.cfg
        call = denoiser_call(env.pipe)
        family, config = call.family, call.model.config
        schedule = self.cut(env, schedule or full_schedule(env, initial_latents.shape))
        guidance = family.uses_guidance(config, cfg.guidance_scale)
        cond = family.prepare_conditioning(config, conditioning.to(env.device, env.dtype),
                                           cfg.guidance_scale, initial_latents.shape[0])
        # Unit noise starts at the scheduler's initial sigma (flow matching: 1).
        scheduler = schedule.scheduler
        sigma = 1.0 if schedule.noised else getattr(scheduler, "init_noise_sigma", 1.0)
        latents = initial_latents.to(env.device).float() * sigma
        sampling = Sampling(
            call, scheduler, schedule.timesteps, cond,
            guidance_scale=float(cfg.guidance_scale) if guidance else None,
            guidance_rescale=float(cfg.get("guidance_rescale") or 0.0),
            extra_input=inpaint.extra_input(guidance) if inpaint is not None else None,
            dtype=env.dtype)
        steps = len(schedule.timesteps)
        hooks: list[LoopHook] = [StrategySteps(env), self.step_cache(env, call)]
        if inpaint is not None:
            hooks.append(Blend(inpaint, schedule))
        hooks.append(FiniteCheck(env, steps, latents.device))
        trajectory = Trajectory() if cfg.save_trajectory else None
        if trajectory is not None:
            hooks.append(trajectory)
        hooks.append(Progress(env, steps))
        latents = denoise(latents, sampling, hooks)
        env.trajectory = (torch.stack(trajectory.kept, dim=1) if trajectory is not None
                          else None)
        return {"latents": latents}

    @staticmethod
    def step_cache(env: StageEnv, call: Any) -> LoopHook:
        """The stage's step cache (its `cache` policy), or a plain count of denoiser calls;
        a cache decides together with the ranks that share the image."""
        options = cache_options(env.stage, env.spec)
        if options is None:
            return CallCount(env.denoiser_calls)
        return StepCache(call.model, call.family, cache_kind(env.spec), options,
                         image_ranks(env.strategy, env.ctx), env.denoiser_calls)

    @staticmethod
    def cut(env: StageEnv, schedule: Schedule) -> Schedule:
        """The part of the schedule this stage runs (a base's or a refiner's)."""
        start = handover(env.cfg, env.spec, "denoising_start")
        if start is not None:  # continues another stage's latents (a refiner)
            schedule = starting_at(schedule, start)
        end = handover(env.cfg, env.spec, "denoising_end")
        if end is not None:  # hands its latents, still noisy, to another stage
            schedule = ending_at(schedule, end)
        return schedule
