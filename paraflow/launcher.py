"""Starting the ranks with Lightning Fabric.

Ranks on one machine are *spawned* (a worker function in a fresh interpreter), never started by
re-running the command line: re-execution pairs ranks wrongly under a Hydra `-m` sweep and would
re-run pytest under a test. Under torchrun or SLURM the ranks already exist and Fabric joins them.
A rank that raises makes torch.multiprocessing stop the others; a collective that waits past
`launcher.timeout_s` raises, so a lost rank cannot hang the run.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
from collections.abc import Callable
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist
from lightning_fabric import Fabric
from lightning_fabric.strategies import DDPStrategy
from lightning_fabric.utilities.imports import _IS_INTERACTIVE
from omegaconf import DictConfig, OmegaConf

from paraflow.comm import Communicator, LinkModel
from paraflow.config import plain_dict
from paraflow.context import ParallelContext
from paraflow.mesh import build_mesh, layout_of
from paraflow.validate import resolve_accelerator

T = TypeVar("T")
Worker = Callable[[ParallelContext, DictConfig], T]


def processes_created_externally() -> bool:
    """True under torchrun (TorchElastic) or a multi-task SLURM job."""
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) > 1


def threads_for_rank(cfg: DictConfig) -> int:
    if cfg.launcher.threads_per_rank is not None:
        return int(cfg.launcher.threads_per_rank)
    return max(1, (os.cpu_count() or 1) // int(cfg.launcher.devices))


def link_model(cfg: DictConfig) -> LinkModel | None:
    """The modeled link of `launcher.link`, or None for the real transport only."""
    link = cfg.launcher.get("link")
    if link is None or link.get("bandwidth_gb_s") is None:
        return None
    return LinkModel(float(link.bandwidth_gb_s) * 1e9, float(link.latency_us) * 1e-6)


def rank_context(cfg: DictConfig, rank: int, world_size: int, local_rank: int,
                 device: torch.device) -> ParallelContext:
    """This rank's context for the run `cfg`: a communicator of its own (its own byte count)
    and the mesh of the strategy's layout. Collective: every rank calls it. Several runs in one
    launch (tests, benchmarks) call it once per run."""
    group = dist.group.WORLD if world_size > 1 else None
    timeout = timedelta(seconds=float(cfg.launcher.timeout_s))
    comm = Communicator(group, world_size, rank, link_model(cfg), timeout=timeout)
    mesh = build_mesh(layout_of(cfg), device.type, timeout) if world_size > 1 else None
    return ParallelContext(rank, world_size, local_rank, device, comm, mesh)


def _on_rank(fabric: Fabric, worker: Worker[T], cfg_dict: dict[str, Any]) -> T:
    cfg = OmegaConf.create(cfg_dict)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads_for_rank(cfg))
    try:
        ctx = rank_context(cfg, fabric.global_rank, fabric.world_size, fabric.local_rank,
                           fabric.device)
        result = worker(ctx, cfg)
        if fabric.world_size > 1:
            # Leave together: a rank that tears down its groups while a peer's transport threads
            # still talk to it can abort the peer at exit ("terminate called without an active
            # exception"), seen once in CI.
            dist.barrier()
        return result
    except BaseException as err:
        # Each failing rank says why: the launcher may report a peer's "connection closed"
        # first, which hides the cause.
        print(f"paraflow: rank {fabric.global_rank} failed: {type(err).__name__}: {err}",
              file=sys.stderr, flush=True)
        raise
    finally:
        torch.set_num_threads(previous_threads)
        if fabric.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def launch(cfg: DictConfig, worker: Worker[T]) -> T:
    """Run `worker(ctx, cfg)` on every rank; return rank 0's result."""
    accelerator = resolve_accelerator(cfg)
    devices, num_nodes = int(cfg.launcher.devices), int(cfg.launcher.num_nodes)
    if devices * num_nodes > 1 and _IS_INTERACTIVE and not processes_created_externally():
        return _launch_from_a_script(cfg, worker)
    strategy: Any = "auto"
    if devices * num_nodes > 1:
        strategy = DDPStrategy(
            start_method="popen" if processes_created_externally() else "spawn",
            process_group_backend="nccl" if accelerator == "cuda" else "gloo",
            timeout=timedelta(seconds=float(cfg.launcher.timeout_s)),
        )
    fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes,
                    strategy=strategy)
    cfg_dict = plain_dict(cfg)
    return fabric.launch(partial(_on_rank, worker=worker, cfg_dict=cfg_dict))


def _launch_from_a_script(cfg: DictConfig, worker: Worker[T]) -> T:
    """Fabric will not spawn ranks from an interactive interpreter (a notebook, a REPL), so there
    the launch runs in a child `python -m paraflow.launcher`, and its result comes back pickled."""
    with tempfile.TemporaryDirectory(prefix="paraflow-launch-") as tmp:
        job, result = Path(tmp) / "job.pkl", Path(tmp) / "result.pkl"
        job.write_bytes(pickle.dumps((plain_dict(cfg), worker)))
        proc = subprocess.run([sys.executable, "-m", "paraflow.launcher", str(job), str(result)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"the ranks failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        return cast(T, pickle.loads(result.read_bytes()))


if __name__ == "__main__":  # the child of _launch_from_a_script
    from paraflow import launcher as _module  # by its importable name, for the spawned ranks

    _cfg_dict, _worker = pickle.loads(Path(sys.argv[1]).read_bytes())
    _result = _module.launch(OmegaConf.create(_cfg_dict), _worker)
    Path(sys.argv[2]).write_bytes(pickle.dumps(_result))
