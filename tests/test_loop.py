"""The denoising loop's hook points (paraflow/loop.py), in-process on a toy denoiser: the loop
equals a hand-written sampling loop, a hook can skip the denoiser and supply its prediction (as a
step cache will), and the points are called in order with the step numbers given."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler

from paraflow.families import Conditioning
from paraflow.loop import LoopHook, Sampling, Step, denoise, guide


class ToyDenoiser:
    """A prediction that depends on the latents, the timestep and the text embeds; counts its
    calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        self.calls += 1
        return torch.tanh(latents * (1 + float(t) / 1000)) + cond.embeds.mean(dim=(1, 2))[
            :, None, None, None]


def _sampling(call: ToyDenoiser, steps: int = 6, guidance: float | None = 4.0) -> Sampling:
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(steps)
    cond = Conditioning(torch.linspace(-1, 1, 2 * 3 * 4).reshape(2, 3, 4), None)
    return Sampling(call, scheduler, scheduler.timesteps, cond, guidance_scale=guidance)


def _hand_loop(latents: torch.Tensor, s: Sampling, reuse_odd: bool = False) -> torch.Tensor:
    """What the loop should compute, written out (reuse_odd: odd steps reuse the last
    prediction)."""
    last = None
    for index, t in enumerate(s.timesteps):
        model_input = torch.cat([latents] * 2)
        model_input = s.scheduler.scale_model_input(model_input, t)
        if reuse_odd and index % 2 == 1:
            prediction = last
        else:
            prediction = s.call(model_input, t, s.cond).float()
        last = prediction
        uncond, text = prediction.chunk(2)
        noise = uncond + 4.0 * (text - uncond)
        latents = s.scheduler.step(noise, t, latents, return_dict=False)[0]
    return latents


def test_the_loop_equals_a_hand_written_sampling_loop() -> None:
    start = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = denoise(start, _sampling(ToyDenoiser()), [])
    theirs = _hand_loop(start, _sampling(ToyDenoiser()))
    assert torch.equal(ours, theirs)


class ReuseOddSteps(LoopHook):
    """A toy step cache: odd steps take the previous step's prediction."""

    def __init__(self) -> None:
        self.last: torch.Tensor | None = None

    def replace_denoiser(self, step: Step, model_input: torch.Tensor) -> torch.Tensor | None:
        return self.last if step.index % 2 == 1 else None

    def after_denoiser(self, step: Step, prediction: torch.Tensor) -> None:
        self.last = prediction


def test_a_hook_can_skip_the_denoiser_and_supply_its_prediction() -> None:
    start = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    call = ToyDenoiser()
    ours = denoise(start, _sampling(call), [ReuseOddSteps()])
    assert call.calls == 3  # of 6 steps
    assert torch.equal(ours, _hand_loop(start, _sampling(ToyDenoiser()), reuse_odd=True))
    assert not torch.equal(ours, denoise(start, _sampling(ToyDenoiser()), []))


class Recorder(LoopHook):
    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    def before_step(self, step: Step) -> None:
        self.seen.append(("before", step.index))

    def after_denoiser(self, step: Step, prediction: torch.Tensor) -> None:
        self.seen.append(("prediction", step.index))

    def after_step(self, step: Step, latents: torch.Tensor) -> torch.Tensor:
        self.seen.append(("after", step.index))
        return latents * 0  # a hook may replace the latents

    def end(self) -> None:
        self.seen.append(("end", -1))


def test_hook_points_run_in_order_with_the_given_step_numbers() -> None:
    recorder = Recorder()
    sampling = _sampling(ToyDenoiser(), steps=2, guidance=None)
    sampling.indices = [3, 4]  # the planner replays chosen steps
    out = denoise(torch.ones(1, 4, 8, 8), sampling, [recorder])
    assert recorder.seen == [("before", 3), ("prediction", 3), ("after", 3),
                             ("before", 4), ("prediction", 4), ("after", 4), ("end", -1)]
    assert torch.equal(out, torch.zeros_like(out))


def test_guidance_rescale_matches_diffusers() -> None:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    prediction = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    uncond, text = prediction.chunk(2)
    want = rescale_noise_cfg(uncond + 7.0 * (text - uncond), text, guidance_rescale=0.7)
    assert torch.equal(guide(prediction, 7.0, 0.7), want)
