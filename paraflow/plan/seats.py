"""Every rank of a run that is not launched, as its strategy sets it up: the strategy's own
`setup` on a planned context (paraflow/plan/planned.py), then what the strategy says of the rank —
its images (`assign_images`), its place (`describe`) and which ranks are alike (`alike_key`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from paraflow.context import ParallelContext
from paraflow.mesh import world_of
from paraflow.plan.planned import planned_context
from paraflow.plugin import planned
from paraflow.registry import build_strategy
from paraflow.run import expanded_prompts


@dataclass
class Seat:
    rank: int
    label: str
    chunks: tuple[int, ...]  # images per pass through the stage graph (pipeline.max_batch)
    key: tuple[Any, ...]  # seats with equal keys are replayed once for all
    strategy: Any  # set up for this rank
    ctx: ParallelContext

    @property
    def images(self) -> int:
        return sum(self.chunks)


def passes(images: int, max_batch: int) -> tuple[int, ...]:
    return tuple(min(max_batch, images - i) for i in range(0, images, max_batch))


def fresh(cfg: DictConfig, rank: int) -> tuple[Any, ParallelContext]:
    """A new strategy of `cfg` (not set up yet) and rank `rank`'s planned context."""
    strategy, world = build_strategy(cfg.strategy), world_of(cfg)
    return strategy, planned_context(rank, world, strategy.mesh_layout(world))


def set_up(cfg: DictConfig, rank: int) -> tuple[Any, ParallelContext]:
    """A new strategy of `cfg`, set up as rank `rank` of the run."""
    strategy, ctx = fresh(cfg, rank)
    strategy.setup(ctx)
    return strategy, ctx


def seats(cfg: DictConfig) -> list[Seat]:
    n, batch = len(expanded_prompts(cfg)), int(cfg.pipeline.max_batch)
    found = []
    for rank in range(world_of(cfg)):
        strategy, ctx = set_up(cfg, rank)
        chunks = passes(len(strategy.assign_images(n, ctx)), batch)
        plan = planned(strategy)
        alike = plan.alike_key(cfg, ctx)
        key = ("rank", rank) if alike is None else ("alike", alike, chunks)
        found.append(Seat(rank, plan.describe(cfg, ctx), chunks, key, strategy, ctx))
    return found
