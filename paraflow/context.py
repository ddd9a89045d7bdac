"""ParallelContext: who this rank is and how it talks to the others. Built once, passed on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from paraflow.comm import Communicator

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


@dataclass(eq=False)
class ParallelContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    comm: Communicator
    # The run's named dimensions (paraflow/mesh.py); None: 1 rank, or not built yet (the
    # strategy's setup builds it once through mesh_of).
    mesh: DeviceMesh | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> ParallelContext:
        """A one-rank context, for notebooks and tests that need no processes."""
        return cls(0, 1, 0, torch.device(device), Communicator(None, 1, 0))
