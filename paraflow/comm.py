"""The communicator: every collective paraflow issues goes through here, so bytes are counted once.

Bytes are what this rank puts on the wire under a ring algorithm: an all-gather of an n-byte
piece sends n·(W−1); an all-reduce of n bytes sends 2·n·(W−1)/W; a broadcast from the source
sends n·(W−1) (other ranks 0). They are kept per denoising step (`step`, set by the loop) and in
total; bookkeeping outside the loop is counted under step None.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist


class Communicator:
    def __init__(self, group: dist.ProcessGroup | None, world_size: int, rank: int) -> None:
        self.group = group
        self.world_size = world_size
        self.rank = rank
        self.step: int | None = None
        self.bytes_by_step: dict[int | None, int] = defaultdict(int)
        self.calls = 0

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_by_step.values())

    def _count(self, nbytes: float) -> None:
        self.bytes_by_step[self.step] += int(nbytes)
        self.calls += 1

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `tensor` (same shape on all ranks), in rank order."""
        if self.world_size == 1:
            return [tensor]
        tensor = tensor.contiguous()
        pieces = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(pieces, tensor, group=self.group)
        self._count(tensor.numel() * tensor.element_size() * (self.world_size - 1))
        return pieces

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over ranks, in place, and return it."""
        if self.world_size > 1:
            dist.all_reduce(tensor, group=self.group)
            nbytes = tensor.numel() * tensor.element_size()
            self._count(2 * nbytes * (self.world_size - 1) / self.world_size)
        return tensor

    def all_gather_uneven(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Gather tensors whose first dimension differs between ranks (others must match)."""
        if self.world_size == 1:
            return [tensor]
        sizes = self.all_gather(torch.tensor([tensor.shape[0]], device=tensor.device))
        counts = [int(s.item()) for s in sizes]
        padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        return [piece[:count] for piece, count in zip(self.all_gather(padded), counts)]

    def gather_objects(self, obj: Any) -> list[Any]:
        """Small Python objects (run statistics) from every rank; not counted as traffic."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.group)
