"""Collectives that move nothing, for replaying a rank's strategy code on meta tensors.

`PlannedComm` returns what a real collective would (fresh pieces of the input's shape, the input
for an all-reduce) and books the bytes exactly as paraflow.comm.Communicator books them, so a
replay of a strategy's own setup/parallelize/steps tells both its memory and its traffic.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from paraflow.comm import Communicator, GatherHandle
from paraflow.context import ParallelContext


class _Sent:
    """Holds the send buffer of an asynchronous all-gather, as the transport's work object does
    until the handle goes."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def wait(self) -> None:
        return None


class PlannedComm(Communicator):
    """Rank `rank` of `world_size` planned ranks."""

    def __init__(self, world_size: int, rank: int, parent: Communicator | None = None) -> None:
        super().__init__(None, world_size, rank, parent=parent)

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        if self.world_size == 1:
            return [tensor]
        self._count(tensor.numel() * tensor.element_size() * (self.world_size - 1))
        return [torch.empty_like(tensor) for _ in range(self.world_size)]

    def all_gather_async(self, tensor: torch.Tensor) -> GatherHandle:
        return GatherHandle(_Sent(tensor), self.all_gather(tensor), None)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            nbytes = tensor.numel() * tensor.element_size()
            self._count(2 * nbytes * (self.world_size - 1) / self.world_size)
        return tensor

    def split(self, groups: Sequence[Sequence[int]]) -> Communicator:
        for ranks in groups:
            members = [int(r) for r in ranks]
            if self.rank in members:
                return PlannedComm(len(members), members.index(self.rank), parent=self)
        raise ValueError(f"rank {self.rank} is in none of the groups {list(groups)}")

    def gather_objects(self, obj: object) -> list[object]:
        return [obj] * self.world_size

    def barrier(self) -> None:
        return None


def planned_context(rank: int, world_size: int) -> ParallelContext:
    """Rank `rank` of a planned run of `world_size` ranks, on the meta device, no mesh."""
    return ParallelContext(rank, world_size, 0, torch.device("meta"),
                           PlannedComm(world_size, rank))
