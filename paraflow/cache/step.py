"""The denoise stage's side of a step cache: the hooks installed on the denoiser once per kind
(its family says where), started and stopped around each generation, the step's schedule
(deepcache, taylorseer) and taylorseer's forecast, and the count of full denoiser calls and
reused steps (run.json)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from paraflow.cache import DeepCacheOptions, FirstBlockOptions, TaylorSeerOptions
from paraflow.cache.hooks import (
    CachedOutput,
    CacheState,
    ProbeHead,
    ResidualHead,
    ResidualRest,
    install,
    remove,
)
from paraflow.cache.taylorseer import TaylorSeries
from paraflow.errors import ParaflowError
from paraflow.loop import LoopHook, Step

_STATE = "_paraflow_step_cache"  # on the denoiser: (kind, state, hooked modules)


def cache_state(model: nn.Module, family: Any, kind: str) -> CacheState:
    """The denoiser's cache of `kind`, its hooks installed on first use (another kind's
    removed first)."""
    held = model.__dict__.get(_STATE)
    if held is not None and held[0] == kind:
        return held[1]  # type: ignore[no-any-return]
    if held is not None:
        for module in held[2]:
            remove(module)
    state = CacheState()
    hooked: list[nn.Module] = []
    blocks = family.cache_blocks(model)
    if blocks:  # a transformer's residual stream: First-Block Cache, TaylorSeer
        if len(blocks) < 2:
            raise ParaflowError(f"cache={kind}: the denoiser has {len(blocks)} transformer "
                                "block(s); the first block runs every step, so caching the "
                                "rest needs two or more")
        split, join = family.split_block_output, family.join_block_output
        install(blocks[0], ResidualHead(state, split, join))
        for index, block in enumerate(blocks[1:], start=2):
            install(block, ResidualRest(state, split, join, last=index == len(blocks)))
        hooked = list(blocks)
    elif kind == "taylorseer":
        raise ParaflowError(f"cache={kind}: the denoiser has no transformer blocks "
                            f"(family {family.name}: cache_blocks) to forecast")
    else:  # a UNet: its first down block probes; the skipped blocks answer from the cache
        if kind == "first_block":
            probe = family.cache_probe(model)
            install(probe, ProbeHead(state))
            hooked.append(probe)
        for block in family.skipped_blocks(model, kind):
            install(block, CachedOutput(state))
            hooked.append(block)
    object.__setattr__(model, _STATE, (kind, state, hooked))
    return state


class StepCache(LoopHook):
    """A generation's cache: started with the run's options and the ranks sharing the image;
    deepcache's and taylorseer's reused steps set before each step (taylorseer's forecast
    with them, fed after each full step); full calls and reused steps counted."""

    def __init__(self, model: nn.Module, family: Any, kind: str, options: Any,
                 comm: Any, counts: Any) -> None:
        self.kind, self.options, self.counts = kind, options, counts
        self.state = cache_state(model, family, kind)
        self.series = TaylorSeries(options.order) \
            if isinstance(options, TaylorSeerOptions) else None
        threshold = options.threshold if isinstance(options, FirstBlockOptions) else 0.0
        self.state.start(threshold, comm, scheduled=not isinstance(options, FirstBlockOptions))

    def before_step(self, step: Step) -> None:
        state, options = self.state, self.options
        if isinstance(options, DeepCacheOptions):
            state.reuse = step.index % options.interval != 0 and bool(state.outputs)
        elif self.series is not None:  # taylorseer: the rest's residual forecast
            state.reuse = not options.full(step.index) and self.series.step is not None
            if state.reuse:
                values = self.series.predict(step.index)
                state.rest = (values[0], values[1] if len(values) > 1 else None)
        else:
            state.reuse = False  # the head block decides during the call

    def after_denoiser(self, step: Step, prediction: torch.Tensor) -> None:
        state = self.state
        if self.series is not None and not state.reuse and state.rest is not None:
            hidden, text = state.rest  # this full step's, recorded by the last block
            self.series.update(step.index, (hidden,) if text is None else (hidden, text))
        self.counts.record(step.index, state.reuse)

    def end(self) -> None:
        self.state.stop()


class CallCount(LoopHook):
    """Without a cache: every step is one full denoiser call."""

    def __init__(self, counts: Any) -> None:
        self.counts = counts

    def after_denoiser(self, step: Step, prediction: torch.Tensor) -> None:
        self.counts.record(step.index, False)
