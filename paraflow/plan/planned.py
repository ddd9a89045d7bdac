"""A rank of a run that is not launched: collectives that move nothing and a mesh without process
groups, so a strategy's own setup/parallelize/steps run unchanged on meta tensors.

`PlannedComm` returns what a real collective would (fresh pieces of the input's shape, the input
for an all-reduce) and books the bytes exactly as paraflow.comm.Communicator books them, so a
replay tells both memory and traffic. It knows the world ranks of its members (`members`), from
which the planner sizes the result gather. The mesh is a real DeviceMesh built without process
groups (DTensor shards parameters over it locally, as the real run's `src_data_rank=None` does).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from paraflow.comm import Communicator, GatherHandle, SendHandle, ShiftHandle
from paraflow.context import ParallelContext
from paraflow.mesh import Layout


class _Sent:
    """Holds the send buffer of an asynchronous all-gather, as the transport's work object does
    until the handle goes."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def wait(self) -> None:
        return None


class PlannedComm(Communicator):
    """Over world ranks `members` (default: all of `world_size`); this rank is members[rank]."""

    def __init__(self, world_size: int, rank: int, parent: Communicator | None = None,
                 members: Sequence[int] | None = None) -> None:
        super().__init__(None, world_size, rank, parent=parent)
        self.members = list(members) if members is not None else list(range(world_size))

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

    def all_to_all(self, pieces: Sequence[torch.Tensor],
                   shapes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        if self.world_size == 1:
            return [pieces[0].reshape(shapes[0])]
        sent = sum(p.numel() for i, p in enumerate(pieces) if i != self.rank)
        self._count(sent * pieces[0].element_size())
        return [pieces[0].new_empty(shape) for shape in shapes]

    def shift_async(self, tensor: torch.Tensor, recv_shape: Sequence[int]) -> ShiftHandle:
        if self.world_size == 1:
            return ShiftHandle([], tensor, None)
        self._count(tensor.numel() * tensor.element_size())
        return ShiftHandle([_Sent(tensor)], tensor.new_empty(tuple(recv_shape)), None)

    def send_async(self, tensor: torch.Tensor, peer: int) -> SendHandle:
        return SendHandle(_Sent(tensor), self._count(tensor.numel() * tensor.element_size()))

    def recv(self, out: torch.Tensor, peer: int) -> torch.Tensor:
        return out  # the sender books the bytes

    def broadcast(self, tensor: torch.Tensor, source: int) -> torch.Tensor:
        if self.world_size > 1 and self.rank == source:
            self._count(tensor.numel() * tensor.element_size() * (self.world_size - 1))
        return tensor

    def _member(self, members: Sequence[int], rank: int) -> PlannedComm:
        return PlannedComm(len(members), rank, parent=self,
                           members=[self.members[m] for m in members])

    def split(self, groups: Sequence[Sequence[int]]) -> Communicator:
        for ranks in groups:
            members = [int(r) for r in ranks]
            if self.rank in members:
                return self._member(members, members.index(self.rank))
        raise ValueError(f"rank {self.rank} is in none of the groups {list(groups)}")

    def along(self, make_group: Callable[[], Any], members: Sequence[int],
              rank: int) -> Communicator:
        return self._member(members, rank)

    def gather_objects(self, obj: object) -> list[object]:
        return [obj] * self.world_size

    def barrier(self) -> None:
        return None


def _mesh(ranks: torch.Tensor, names: tuple[str, ...], rank: int) -> Any:
    from torch.distributed.device_mesh import DeviceMesh

    class PlannedMesh(DeviceMesh):
        """Slices (mesh["tensor"]) without process groups: the line of ranks holding this one."""

        def __getitem__(self, dim: Any) -> Any:
            if not isinstance(dim, str):
                raise NotImplementedError("a planned mesh slices one dimension at a time")
            index = names.index(dim)
            lines = ranks.movedim(index, -1).reshape(-1, ranks.shape[index])
            line = next(row for row in lines if rank in row.tolist())
            return _mesh(line, (dim,), rank)

    # torch's own flags for a mesh whose groups are never made
    return PlannedMesh("cpu", ranks, mesh_dim_names=names, _init_backend=False, _rank=rank)


def planned_mesh(layout: Layout, rank: int) -> Any:
    """Rank `rank`'s DeviceMesh of `layout`, without process groups."""
    ranks = torch.arange(int(torch.tensor(list(layout.values())).prod()))
    return _mesh(ranks.reshape(tuple(layout.values())), tuple(layout), rank)


def planned_context(rank: int, world_size: int, layout: Layout | None = None) -> ParallelContext:
    """Rank `rank` of a planned run of `world_size` ranks on the meta device, with the mesh of
    `layout` (the strategy's mesh_layout) as the launcher would build it."""
    mesh = planned_mesh(layout, rank) if layout is not None and world_size > 1 else None
    return ParallelContext(rank, world_size, 0, torch.device("meta"),
                           PlannedComm(world_size, rank), mesh)
