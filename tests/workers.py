"""Rank workers for launcher tests; importable so spawned ranks can find them."""

from __future__ import annotations

import time

import torch
from omegaconf import DictConfig

from paraflow.context import ParallelContext


def stall_on_rank_1(ctx: ParallelContext, cfg: DictConfig) -> float:
    """Rank 1 never joins the collective; rank 0 must time out, not hang."""
    start = time.perf_counter()
    if ctx.rank == 1:
        time.sleep(600)
    ctx.comm.all_reduce(torch.ones(4))
    return time.perf_counter() - start


def count_bytes(ctx: ParallelContext, cfg: DictConfig) -> dict[int | None, int]:
    """Known collectives at known steps; returns rank 0's tally."""
    comm = ctx.comm
    comm.step = 0
    pieces = comm.all_gather(torch.full((10,), float(ctx.rank)))  # 40 bytes, sent to 1 peer
    assert [int(p[0]) for p in pieces] == list(range(ctx.world_size))
    comm.step = 1
    total = comm.all_reduce(torch.ones(8, dtype=torch.float64))  # 64 bytes
    assert float(total[0]) == ctx.world_size
    uneven = comm.all_gather_uneven(torch.arange(ctx.rank + 1, dtype=torch.int64))
    assert [p.tolist() for p in uneven] == [list(range(r + 1)) for r in range(ctx.world_size)]
    return dict(comm.bytes_by_step)
