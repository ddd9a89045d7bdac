"""One pass of a rank's generation replayed on the meta device: its peak working memory, the
FLOPs of each step and, on the planned communicator, the bytes of every collective it makes.

The strategy's own code runs, set up and parallelised as for the real run (patch layers, band
hooks, stale buffers and asynchronous buckets, DTensor shards, the guidance split, the decode in
bands), over `PlannedComm` — a communicator that moves nothing but returns the fresh tensors a
real collective would — with the denoise stage's step cache, if any (cache.py). `LiveBytes`
counts every tensor alive at each op, `Flops` the products of each step; the scheduler step is
stood in for by two latent-sized ops, and the images' post-processing by the float and uint8
copies it makes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from paraflow.context import ParallelContext
from paraflow.families import Conditioning, denoiser_call
from paraflow.loop import LoopHook, Sampling, Step, denoise
from paraflow.plan.cache import PlannedCache, cache_hooks
from paraflow.plan.flops import Flops
from paraflow.plan.live import LiveBytes
from paraflow.plugin import image_ranks


@dataclass
class Inputs:
    """What the denoiser and the decoder are called with (shapes of the real run)."""

    latent: tuple[int, int, int]  # C, h, w
    tokens: int
    guidance: bool
    added: dict[str, tuple[int, ...]] | None  # Conditioning.added's shapes per image


@dataclass
class Replayed:
    denoise_peak: int  # most live bytes while denoising
    decode_peak: int
    carried: int  # most bytes the strategy holds from one step to the next (stale buffers)
    booked: dict[int | None, int]  # bytes sent per replayed step; None: after the steps
    flops: dict[int | None, int]  # FLOPs per replayed step (flops.py); None: the decode


class StandInScheduler:
    """The scheduler step as its memory sees it: latent-sized temporaries."""

    def step(self, noise: torch.Tensor, t: torch.Tensor, latents: torch.Tensor,
             return_dict: bool = False) -> tuple[torch.Tensor]:
        return (latents * 0.5 + noise * 0.5,)


class StrategyReplay(LoopHook):
    """The strategy's step hooks, as the Denoise stage calls them; the step named for the
    communicator's bytes and the FLOPs."""

    def __init__(self, strategy: Any, ctx: ParallelContext, flops: Flops) -> None:
        self.strategy, self.ctx, self.flops = strategy, ctx, flops

    def before_step(self, step: Step) -> None:
        self.ctx.comm.step = self.flops.step = step.index
        self.strategy.on_step(step.index, self.ctx)

    def end(self) -> None:
        self.ctx.comm.step = self.flops.step = None
        self.strategy.on_denoise_end(self.ctx)


class Carried(LoopHook):
    """The most bytes live between steps beyond those live before the first (what the
    strategy carries from one step to the next)."""

    def __init__(self, live: LiveBytes) -> None:
        self.live, self.before, self.most = live, live.live, 0

    def after_step(self, step: Step, latents: torch.Tensor) -> torch.Tensor:
        self.most = max(self.most, self.live.live - self.before)
        return latents


def replay(strategy: Any, ctx: ParallelContext, unet: Any, vae: Any, inputs: Inputs,
           images: int, replayed: list[int], in_bands: bool, cpu: bool,
           cache: PlannedCache | None = None) -> Replayed:
    """`images` images through the meta `unet` and `vae` as `strategy` runs them on `ctx`'s rank:
    the steps `replayed` (rank.py: step_kinds), with the stage's step cache (`cache`) deciding as
    planned, then the decode (in bands: `in_bands`). `cpu`: CPU convolution workspace
    (live.py)."""
    unet_dtype = next(unet.parameters()).dtype
    vae_dtype = next(vae.parameters()).dtype
    weights = [*unet.parameters(), *unet.buffers(), *vae.parameters(), *vae.buffers()]
    live = LiveBytes(exclude=weights, cpu_convolutions=cpu)
    flops = Flops()  # below `live`: what it decomposes, live never sees
    batch = images * (2 if inputs.guidance else 1)
    meta = torch.device("meta")
    carried = 0
    with torch.inference_mode(), flops, live:
        call = denoiser_call(unet)
        embeds = torch.empty(batch, inputs.tokens, call.family.context_width(unet.config),
                             dtype=unet_dtype, device=meta)
        added = None if inputs.added is None else {
            k: torch.empty(batch, *shape, dtype=unet_dtype, device=meta)
            for k, shape in inputs.added.items()}
        cond = Conditioning(embeds, added)
        initial = torch.empty(images, *inputs.latent, device=meta)  # kept by the stage graph
        start = [initial * 1.0]  # handed over, not kept: the loop frees it after the first step
        timesteps = [torch.tensor(500, device=meta)] * len(replayed)
        carry = Carried(live)
        sampling = Sampling(call, StandInScheduler(), timesteps, cond,
                            guidance_scale=5.0 if inputs.guidance else None, dtype=unet_dtype,
                            indices=replayed)
        hooks: list[LoopHook] = [StrategyReplay(strategy, ctx, flops)]
        if cache is not None:
            hooks += cache_hooks(unet, call.family, cache, image_ranks(strategy, ctx))
        latents = denoise(start.pop(), sampling, [*hooks, carry])
        carried = carry.most
        denoise_peak = live.peak
        live.reset_peak()
        scaled = latents.to(vae_dtype) / 0.5
        if in_bands:
            decoded = strategy.decode_in_bands(vae, scaled, ctx)  # a BandedVAE (in_bands)
        else:
            decoded = vae.decode(scaled, return_dict=False)[0]
        pixels = (decoded.float() * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
        rounded = (pixels * 255).round()  # pixels_to_uint8's copies
        _ = rounded.to(torch.uint8)
    return Replayed(denoise_peak, live.peak, carried, dict(ctx.comm.bytes_by_step),
                    dict(flops.by_step))
