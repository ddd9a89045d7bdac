"""One kind of rank (seats with equal keys): the rank's Session (paraflow/session.py: the
strategy set up and laid over the pipeline, as a run builds it) on meta modules, then a replay of
each pass it makes through the same denoise loop (simulate.py), with the run's step cache if any
(cache.py), giving its weights, its peak working memory, and the bytes it sends and the FLOPs it
computes at every step and in the decode."""

from __future__ import annotations

from collections import Counter
from functools import partial
from types import SimpleNamespace
from typing import Any

import torch
from hydra.utils import get_class
from omegaconf import DictConfig
from torch import nn

from paraflow.config import StageParallel
from paraflow.context import ParallelContext
from paraflow.graph import execution_order
from paraflow.models.components import TEXT_ENCODERS
from paraflow.models.skeleton import component_skeleton, denoiser_component
from paraflow.plan.cache import PlannedCache
from paraflow.plan.seats import Seat, fresh
from paraflow.plan.simulate import Inputs, replay
from paraflow.plan.weights import Policy, module_bytes
from paraflow.plugin import banded_vae, planned
from paraflow.session import Session


def _skeleton(model_cfg: DictConfig, name: str, policies: dict[str, Policy],
              needed: bool = True) -> Any:
    module = component_skeleton(model_cfg, name)
    if module is None:
        if not needed:
            return None
        raise RuntimeError(f"model={model_cfg.name}: no {name} module from its config")
    dtype = policies.get(name, Policy()).dtype
    return nn.Module.to(module, dtype=dtype)  # nn.Module's: diffusers' warns on every cast


def skeleton_pipeline(model_cfg: DictConfig, scheduler_cfg: DictConfig | None,
                      policies: dict[str, Policy]) -> SimpleNamespace:
    """What the planner's Session loads: the denoiser, the VAE and the text encoders on the meta
    device, in the stages' precisions (a strategy may shard the text encoders' weights too)."""
    name = denoiser_component(model_cfg)
    parts = {name: _skeleton(model_cfg, name, policies),
             "vae": _skeleton(model_cfg, "vae", policies)}
    for encoder in TEXT_ENCODERS:
        module = _skeleton(model_cfg, encoder, policies, needed=False)
        if module is not None:
            parts[encoder] = module
    return SimpleNamespace(**parts)


def encode_bytes(pipe: Any, ctx: ParallelContext, calls: int) -> int:
    """Bytes one pass's encode stage sends: nothing, unless the strategy shards the text
    encoders' weights (gathered at each call). Each text encoder is called `calls` times on
    meta token ids, as the pipelines call it once for the prompts and once more for the
    negative prompt with guidance (the bytes are the weights': one token will do)."""
    before = ctx.comm.total_bytes
    ids = torch.zeros(1, 1, dtype=torch.long, device="meta")
    with torch.inference_mode():
        for encoder in filter(None, (getattr(pipe, n, None) for n in TEXT_ENCODERS)):
            for _ in range(calls):
                encoder(ids)
    return ctx.comm.total_bytes - before


def patch_decode_wanted(cfg: DictConfig, strategy: Any) -> bool:
    """Whether the decode stage runs in bands (pipeline.stages.*.parallel, as Decode reads it):
    the last stage of the graph that uses the VAE (img2img's encode comes before it)."""
    stages = cfg.pipeline.stages
    for name in reversed(execution_order(stages)):
        spec = stages[name]
        if "vae" in getattr(get_class(spec._target_), "components", ()):
            parallel = StageParallel(spec.get("parallel", "none"))
            shared = strategy.replicated_latents
            return parallel is StageParallel.patch or (parallel is StageParallel.auto and shared)
    return False


def step_like(distinct: list[int], step: int) -> int:
    """The replayed step that `step` costs like (Strategy.distinct_steps)."""
    return max((s for s in distinct if s <= step), default=min(distinct))


def step_kinds(distinct: list[int], cache: PlannedCache | None,
               steps: int) -> tuple[list[int], list[int]]:
    """(the steps to replay, in order; per step of the run, the replayed step it costs like).
    Without a step cache: the strategy's distinct steps. With one, a step's kind is also
    whether it reuses and whether it is the first (nothing cached, nothing to decide); each kind
    is replayed at the strategy's own distinct step where that step is of the kind, else at its
    first step (so step 0, with nothing cached, is always replayed first)."""
    def kind(step: int) -> tuple[Any, ...]:
        like = step_like(distinct, step)
        return (like,) if cache is None else (like, step == 0, cache.reuse[step])

    chosen: dict[tuple[Any, ...], int] = {}
    for step in range(steps):
        key, own = kind(step), step_like(distinct, step)
        if key not in chosen:
            chosen[key] = own if own < steps and kind(own) == key else step
    costs = [chosen[kind(step)] for step in range(steps)]
    return sorted(set(costs)), costs


class RankWork:
    """Weights, traffic and memory of the ranks that share `seat`'s key."""

    def __init__(self, cfg: DictConfig, seat: Seat, inputs: Inputs,
                 policies: dict[str, Policy], cpu: bool, cache: PlannedCache | None) -> None:
        steps = int(cfg.steps)
        self.per_step, self.decode, self.carried, self.encode = [0] * steps, 0, 0, 0
        self.flops_per_step, self.flops_decode = [0] * steps, 0
        full = cache.full_calls if cache is not None else steps
        self.denoiser_calls = full * len(seat.chunks)  # full calls, one per step and pass
        self.peaks = (0, 0)
        self.weights: dict[str, int] = {}
        sizes = Counter(seat.chunks) or Counter({0: 0})  # no images: parallelised all the same
        name = denoiser_component(cfg.model)
        for images, count in sizes.items():
            # The replay leaves state behind: each pass size in a session of its own.
            strategy, ctx = fresh(cfg, seat.rank)
            session = Session(ctx, cfg, strategy, load=partial(skeleton_pipeline,
                                                               policies=policies))
            unet, vae = getattr(session.pipe, name), session.pipe.vae
            self.weights = {n: module_bytes(m, policies.get(n, Policy()).dtype)
                            for n, m in vars(session.pipe).items() if isinstance(m, nn.Module)}
            if not images:
                continue
            banded = banded_vae(strategy)
            in_bands = (patch_decode_wanted(cfg, strategy) and banded is not None
                        and banded.image_comm(ctx).world_size > 1)
            replayed, costs = step_kinds(planned(strategy).distinct_steps(steps), cache, steps)
            done = replay(strategy, ctx, unet, vae, inputs, images, replayed, in_bands, cpu,
                          cache)
            # after the replay, whose bytes it has taken: these are the encode stage's
            self.encode += count * encode_bytes(session.pipe, ctx, 2 if inputs.guidance else 1)
            self.peaks = (max(self.peaks[0], done.denoise_peak),
                          max(self.peaks[1], done.decode_peak))
            self.carried = max(self.carried, done.carried)
            for step, like in enumerate(costs):
                self.per_step[step] += count * done.booked.get(like, 0)
                self.flops_per_step[step] += count * done.flops.get(like, 0)
            self.decode += count * done.booked.get(None, 0)
            self.flops_decode += count * done.flops.get(None, 0)
