"""The test session's kept ranks: one pool per rank count, started on first use and stopped at
the end of the session (conftest's pytest_sessionfinish). Multi-rank runs that are expected to
succeed go through them, so the suite pays a launch per rank count, not per module or case. Runs
that test the launcher itself (failures, timeouts, the CLI, torchrun) still launch their own."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from paraflow.pool import RankPools

POOLS = RankPools()


def run_pooled(cfg: DictConfig, worker: Any) -> Any:
    """`worker(ctx, cfg)` on the session's launcher.devices ranks; rank 0's result."""
    return POOLS.of(int(cfg.launcher.devices)).run(worker, cfg)
