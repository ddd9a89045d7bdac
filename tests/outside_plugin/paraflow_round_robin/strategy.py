"""Rank r makes images r, r + N, r + 2N, ... (or from the last rank with reverse=true); every
rank holds the whole model; rank 0 gathers (StrategyBase's gather, over every rank) and writes."""

from __future__ import annotations

from typing import Any

from paraflow.errors import ParaflowError
from paraflow.plugin import StrategyBase


class RoundRobin(StrategyBase):
    name = "round_robin"

    def __init__(self, reverse: bool = False) -> None:
        self.reverse = reverse

    @property
    def mode(self) -> str:
        return self.name + (" reverse" if self.reverse else "")

    def validate(self, cfg: Any) -> None:
        world = int(cfg.launcher.devices) * int(cfg.launcher.num_nodes)
        prompts = [cfg.prompt] if isinstance(cfg.prompt, str) else list(cfg.prompt)
        images = len(prompts) * int(cfg.images_per_prompt)
        if images < world:
            raise ParaflowError(f"strategy round_robin: {images} image(s) for {world} ranks; "
                                "give at least one image per rank")

    def assign_images(self, n_images: int, ctx: Any) -> list[int]:
        me = ctx.world_size - 1 - ctx.rank if self.reverse else ctx.rank
        return list(range(me, n_images, ctx.world_size))
