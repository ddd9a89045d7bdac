"""The `data` dimension of a hybrid mesh: replica r makes the r-th contiguous block of the images
(dealt as strategy=data deals them to ranks) and every rank of a replica holds all of its images,
so only the ranks on rank 0's data row (first rank of each replica) gather them to rank 0."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from paraflow.comm import Communicator
from paraflow.context import ParallelContext
from paraflow.mesh import dim_comm
from paraflow.strategies.data import split_evenly

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


@dataclass
class DataReplicas:
    comm: Communicator | None = None  # this rank's ranks along `data` (None: one replica)
    gathers: bool = False  # this rank is on rank 0's data row: it takes part in the gather

    @classmethod
    def of(cls, ctx: ParallelContext, mesh: DeviceMesh | None) -> DataReplicas:
        if mesh is None or mesh.shape[0] == 1:
            return cls()
        coordinate = mesh.get_coordinate() or ()
        return cls(dim_comm(ctx, mesh, "data"), all(c == 0 for c in coordinate[1:]))

    def assign(self, n_images: int) -> list[int]:
        if self.comm is None:
            return list(range(n_images))
        return list(split_evenly(n_images, self.comm.world_size, self.comm.rank))

    def result_comm(self) -> Communicator | None:
        """The ranks on rank 0's data row gather over `data`; with one replica every rank
        already holds every image."""
        return self.comm if self.gathers else None

    def label(self) -> str:
        """This replica's place, for the planner's role labels ('' with one replica)."""
        return f"data {self.comm.rank} · " if self.comm is not None else ""
