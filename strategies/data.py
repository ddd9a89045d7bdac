"""Data parallelism: each rank a full replica; the images (prompts × images_per_prompt) are dealt
out in contiguous blocks, larger blocks first when the split is uneven; rank 0 writes them all."""

from __future__ import annotations

from collections.abc import Hashable

from omegaconf import DictConfig

from paraflow.context import ParallelContext
from paraflow.mesh import Layout
from paraflow.strategies.base import ReplicatedModel


def split_evenly(n_items: int, n_parts: int, part: int) -> range:
    """The `part`-th of `n_parts` contiguous blocks of range(n_items); sizes differ by at most 1."""
    base, extra = divmod(n_items, n_parts)
    start = part * base + min(part, extra)
    return range(start, start + base + (1 if part < extra else 0))


class DataStrategy(ReplicatedModel):
    name = "data"

    def mesh_layout(self, world_size: int) -> Layout | None:
        return {"data": world_size}  # a 1-D mesh: rank = replica

    def assign_images(self, n_images: int, ctx: ParallelContext) -> list[int]:
        return list(split_evenly(n_images, ctx.world_size, ctx.rank))

    def describe(self, cfg: DictConfig, ctx: ParallelContext) -> str:
        return f"data {ctx.rank}/{ctx.world_size}"

    def alike_key(self, cfg: DictConfig, ctx: ParallelContext) -> Hashable | None:
        return "replica"  # whole models: only the image counts differ
