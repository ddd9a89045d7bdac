"""One device: the strategy used when none is given."""

from __future__ import annotations

from collections.abc import Hashable

from omegaconf import DictConfig

from paraflow.context import ParallelContext
from paraflow.strategies.base import ReplicatedModel


class SingleDevice(ReplicatedModel):
    name = "single"

    def describe(self, cfg: DictConfig, ctx: ParallelContext) -> str:
        return "whole model, every image"

    def alike_key(self, cfg: DictConfig, ctx: ParallelContext) -> Hashable | None:
        return "replica"
