"""Several runs, few launches: configs that share a launcher (rank count, threads, nodes) run one
after another in ONE launch of their ranks, because starting ranks costs seconds that would
dwarf a small run, and because runs interleaved in one launch see the same machine drift.

Used by the benchmark, the parity report and the tests.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, open_dict

from paraflow.config import plain_dict
from paraflow.context import ParallelContext
from paraflow.launcher import launch
from paraflow.memory import track_live_tensors
from paraflow.pool import RankPools
from paraflow.run import run_each_on_rank
from paraflow.validate import validate


def _runs_tracking_memory(ctx: ParallelContext, cfg: DictConfig,
                          runs: list[dict[str, Any]]) -> list[Any]:
    """run_each_on_rank with the resident set following live tensors (memory passes)."""
    track_live_tensors()
    return run_each_on_rank(ctx, cfg, runs)


def _launch_key(cfg: DictConfig) -> tuple[Any, ...]:
    launcher = cfg.launcher
    return (int(launcher.devices), int(launcher.num_nodes), launcher.threads_per_rank,
            str(launcher.accelerator))


def prepared(cfg: DictConfig, output_dir: str | Path) -> DictConfig:
    """`cfg` checked (errors before any rank starts) and pointed at `output_dir`."""
    validate(cfg, output_dir)
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.output_dir = str(Path(output_dir).resolve())
    return cfg


def launch_many(cfgs: Sequence[DictConfig], discard_first: bool = False,
                track_memory: bool = False, pools: RankPools | None = None
                ) -> list[dict[str, Any]]:
    """Run every config (each with its own output_dir set, see `prepared`); rank 0's records in
    the order given. Configs with the same launcher share a launch. `discard_first`: each launch
    first repeats its first run into `<output_dir>.warmup` and drops it (one-time costs: thread
    pools, allocator growth). `track_memory`: working-memory figures follow live tensors (slower
    allocation; do not time such runs). A one-rank launch runs in this process, so with
    `track_memory` the allocator setting stays for the rest of it. `pools`: one-node launches of
    several ranks run on these kept ranks instead (paraflow.pool; not with `track_memory`, which
    changes the ranks' allocator for good)."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for index, cfg in enumerate(cfgs):
        groups.setdefault(_launch_key(cfg), []).append(index)
    records: list[dict[str, Any]] = [{}] * len(cfgs)
    worker = _runs_tracking_memory if track_memory else run_each_on_rank
    for indices in groups.values():
        runs = [plain_dict(cfgs[i]) for i in indices]
        if discard_first:
            runs.insert(0, {**runs[0], "output_dir": f"{runs[0]['output_dir']}.warmup"})
        first = cfgs[indices[0]]
        job = functools.partial(worker, runs=runs)
        pooled = (not track_memory and int(first.launcher.devices) > 1
                  and int(first.launcher.num_nodes) == 1)
        if pools is not None and pooled:
            result = pools.of(int(first.launcher.devices)).run(job, first)
        else:
            result = launch(first, job)
        done = list(result or [])[1 if discard_first else 0:]
        for i, record in zip(indices, done):
            records[i] = record
    return records
