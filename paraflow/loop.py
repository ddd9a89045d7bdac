"""The denoising loop, and the points where strategies, accelerators and hosts hook into it.

Each step, in order:

    before_step(step)                 a strategy's per-step state (warm-up, stale buffers)
    replace_denoiser(step, input)     a hook may return the prediction itself (a step cache, a
                                      planner's stand-in): the denoiser is then not called
    after_denoiser(step, prediction)  the prediction, before guidance (a cache keeps it)
    -- classifier-free guidance, the scheduler step --
    after_step(step, latents)         may return other latents (inpaint's blend); progress,
                                      trajectory, finiteness checks look here
    end()                             after the last step (a strategy drops its buffers)

The Denoise stage (stages/denoise.py) and the planner's replay (plan/simulate.py) run this same
loop; neither copies it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from paraflow.families import Conditioning


@dataclass
class Step:
    """One step of the loop: its index among the steps run (0 first), their count, and the
    scheduler's timestep."""

    index: int
    count: int
    timestep: torch.Tensor


class LoopHook:
    """A hook's points, each a no-op here: subclasses override the ones they need."""

    def before_step(self, step: Step) -> None:
        return None

    def replace_denoiser(self, step: Step, model_input: torch.Tensor) -> torch.Tensor | None:
        return None

    def after_denoiser(self, step: Step, prediction: torch.Tensor) -> None:
        return None

    def after_step(self, step: Step, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def end(self) -> None:
        return None


@dataclass
class Sampling:
    """What the loop samples with: the denoiser's call (latents, timestep, cond → prediction),
    the scheduler and its timesteps, the conditioning, the guidance scale (None: no
    classifier-free guidance) and its rescale, channels an inpainting denoiser reads beside the
    latents, and the dtype the denoiser runs in."""

    call: Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]
    scheduler: Any
    timesteps: Sequence[torch.Tensor] | torch.Tensor
    cond: Conditioning
    guidance_scale: float | None = None
    guidance_rescale: float = 0.0
    extra_input: torch.Tensor | None = None
    dtype: torch.dtype = torch.float32
    indices: Sequence[int] | None = None  # the step numbers hooks see (default 0, 1, ...)


def denoise(latents: torch.Tensor, sampling: Sampling, hooks: Sequence[LoopHook]) -> torch.Tensor:
    """Run every timestep of `sampling` on `latents` (fp32), calling `hooks` at each point."""
    indices = sampling.indices if sampling.indices is not None else range(len(sampling.timesteps))
    for index, t in zip(indices, sampling.timesteps):
        step = Step(index, len(sampling.timesteps), t)
        for hook in hooks:
            hook.before_step(step)
        latents = one_step(latents, step, sampling, hooks)  # its temporaries freed on return
        for hook in hooks:
            latents = hook.after_step(step, latents)
    for hook in hooks:
        hook.end()
    return latents


def one_step(latents: torch.Tensor, step: Step, s: Sampling,
             hooks: Sequence[LoopHook]) -> torch.Tensor:
    """The denoiser's prediction (or a hook's), guidance and the scheduler step."""
    t, guided = step.timestep, s.guidance_scale is not None
    model_input = torch.cat([latents] * 2) if guided else latents
    if hasattr(s.scheduler, "scale_model_input"):  # flow matching has none
        model_input = s.scheduler.scale_model_input(model_input, t)
    if s.extra_input is not None:  # an inpainting UNet's mask and masked-image channels
        model_input = torch.cat([model_input, s.extra_input.to(model_input.dtype)], dim=1)
    prediction = next((p for hook in hooks
                       if (p := hook.replace_denoiser(step, model_input)) is not None), None)
    if prediction is None:
        prediction = s.call(model_input.to(s.dtype), t, s.cond).float()
    del model_input
    for hook in hooks:
        hook.after_denoiser(step, prediction)
    noise = guide(prediction, s.guidance_scale, s.guidance_rescale) if guided else prediction
    del prediction
    return s.scheduler.step(noise, t, latents, return_dict=False)[0]  # type: ignore[no-any-return]


def guide(prediction: torch.Tensor, scale: float | None, rescale: float) -> torch.Tensor:
    """Classifier-free guidance over the batch [unconditional; conditional], rescaled as
    diffusers rescales it (guidance_rescale > 0)."""
    uncond, text = prediction.chunk(2)
    noise = uncond + float(scale or 0.0) * (text - uncond)
    return rescale_noise_cfg(noise, text, guidance_rescale=rescale) if rescale > 0 else noise
