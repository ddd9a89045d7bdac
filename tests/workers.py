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


def conv_in_after_warmup(ctx: ParallelContext, cfg: DictConfig) -> list[dict[str, float]]:
    """Displaced patch with warm-up 1: UNet calls at steps 0..3 on a new latent each step (the
    same on every rank). Per step: how far conv_in's band output is from the one-device conv_in
    of the current latent, and how far that one-device output is from the same conv over the
    PREVIOUS step's latent (what stale halo rows would be near; must be large, or the test
    could not fail)."""
    from paraflow.families import Conditioning, denoiser_call
    from paraflow.models import load_pipeline
    from paraflow.registry import build_strategy

    pipe = load_pipeline(cfg.model, cfg.scheduler)
    strategy = build_strategy(cfg.strategy)
    strategy.setup(ctx)
    strategy.parallelize(pipe, ctx)
    unet, call = pipe.unet, denoiser_call(pipe)  # the strategy hooks the call, not the UNet
    outputs: list[torch.Tensor] = []
    unet.conv_in.register_forward_hook(lambda m, a, out: outputs.append(out))
    gen = torch.Generator().manual_seed(0)
    embeds = torch.randn(2, 16, unet.config.cross_attention_dim, generator=gen)
    report, previous = [], None
    with torch.inference_mode():
        for step in range(4):
            strategy.on_step(step, ctx)
            sample = torch.randn(2, unet.config.in_channels, 16, 16, generator=gen)
            call(sample, torch.tensor(500), Conditioning(embeds, None))  # as the loop calls it
            plan = strategy.state.plan
            whole = unet.conv_in.conv(sample)[..., plan.start:plan.stop, :]
            stale = (whole - unet.conv_in.conv(previous)[..., plan.start:plan.stop, :]
                     if previous is not None else torch.zeros(()))
            report.append({"error": float((outputs[-1] - whole).abs().max()),
                           "stale_distance": float(stale.abs().max())})
            previous = sample
    return report


def exit_on_rank_1(ctx: ParallelContext, cfg: DictConfig) -> int:
    """Rank 1 leaves with exit code 3 (no exception) in the middle of 'denoise step 2 of 5'."""
    import os

    from paraflow.errors import set_stage

    set_stage("denoise", 2, 5)
    if ctx.rank == 1:
        os._exit(3)
    ctx.comm.all_reduce(torch.ones(4))
    return ctx.rank


def big_result(ctx: ParallelContext, cfg: DictConfig) -> bytes:
    """A result far larger than a pipe's buffer (64 KiB), as a benchmark's records are."""
    return bytes([ctx.rank]) * (4 << 20)


def rank_pids(ctx: ParallelContext, cfg: DictConfig) -> list[int]:
    """Every rank's process id (a collective), rank 0's list."""
    import os

    return [int(p[0]) for p in ctx.comm.all_gather(torch.tensor([os.getpid()]))]
