"""The steps a denoise stage runs: txt2img runs them all from pure noise; img2img and inpaint
start part-way, at the step their `strength` names, from the input image's noised latents."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from paraflow.families import denoiser_call
from paraflow.graph import StageEnv


@dataclass
class Schedule:
    """A configured copy of the run's scheduler (it keeps per-run state) and the timesteps to
    run, the first one first. `noised`: the latents handed with it are already noised to the
    first timestep; otherwise they are unit noise, scaled by the scheduler's initial sigma."""

    scheduler: Any
    timesteps: torch.Tensor
    noised: bool = False

    @property
    def first(self) -> torch.Tensor:
        return self.timesteps[:1]


def full_schedule(env: StageEnv, latent_shape: torch.Size | tuple[int, ...]) -> Schedule:
    """Every step of `env.cfg.steps`, as the family's pipeline sets them."""
    scheduler = copy.deepcopy(env.pipe.scheduler)
    call = denoiser_call(env.pipe)
    call.family.set_timesteps(scheduler, int(env.cfg.steps), env.device, call.model.config,
                              latent_shape)
    return Schedule(scheduler, scheduler.timesteps)


def first_step(steps: int, strength: float, flow_matching: bool) -> int:
    """The index of the first of `steps` steps that `strength` runs, as diffusers' img2img
    pipelines round it (get_timesteps): SD/SDXL run int(steps × strength) steps; SD3 and Flux
    start at int(steps × (1 − strength)), so they run the rounded-up count."""
    run = steps * strength if flow_matching else int(steps * strength)
    return int(max(steps - min(run, steps), 0))


def from_strength(schedule: Schedule, strength: float) -> Schedule:
    """The last `strength` of the steps (first_step), the scheduler told where it begins."""
    scheduler = schedule.scheduler
    steps = len(schedule.timesteps) // scheduler.order
    flow = not hasattr(scheduler, "add_noise")  # flow matching scales, not adds, noise
    start = first_step(steps, strength, flow) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return Schedule(scheduler, schedule.timesteps[start:], noised=True)


def _cutoff(scheduler: Any, fraction: float) -> int:
    """The training timestep a fraction of the way through denoising (SDXL's hand-over)."""
    total = int(scheduler.config.num_train_timesteps)
    return int(round(total - fraction * total))


def ending_at(schedule: Schedule, fraction: float) -> Schedule:
    """The steps before `fraction` of the way (SDXL's denoising_end): the base's part."""
    cutoff = _cutoff(schedule.scheduler, fraction)
    kept = int((schedule.timesteps >= cutoff).sum())
    return Schedule(schedule.scheduler, schedule.timesteps[:kept], schedule.noised)


def starting_at(schedule: Schedule, fraction: float) -> Schedule:
    """The steps from `fraction` of the way on (denoising_start), as the SDXL img2img pipeline
    cuts them: the refiner's part, continuing from the base's latents."""
    scheduler = schedule.scheduler
    count = int((schedule.timesteps < _cutoff(scheduler, fraction)).sum())
    if scheduler.order == 2 and count % 2 == 0:
        count += 1  # a second-order scheduler's steps come in pairs after the first
    start = len(schedule.timesteps) - count
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return Schedule(scheduler, schedule.timesteps[start:], noised=True)


def handover(cfg: Any, spec: Any, key: str) -> float | None:
    """A denoise stage's denoising_start / denoising_end: None unless its options name `key`;
    the run's `denoising_end` (one hand-over point for both stages) when set, else the
    option's value."""
    options = spec.get("options") or {}
    if key not in options:
        return None
    run = cfg.get("denoising_end")
    return float(run if run is not None else options[key])


def run_strength(cfg: Any, spec: Any) -> float:
    """The run's `strength`, else the stage's own default (options.strength), else 1."""
    value = cfg.get("strength")
    if value is None:
        value = (spec.get("options") or {}).get("strength", 1.0)
    return float(value)
