"""Starting the ranks with Lightning Fabric.

Ranks on one machine are *spawned* (a worker function in a fresh interpreter), never started by
re-running the command line: re-execution pairs ranks wrongly under a Hydra `-m` sweep and would
re-run pytest under a test. Under torchrun or SLURM the ranks already exist and Fabric joins them;
they take rank 0's `output_dir` and every rank gets rank 0's result.
A rank that raises makes torch.multiprocessing stop the others; a collective that waits past
`launcher.timeout_s` raises, so a lost rank cannot hang the run. With `explain=True` (the API and
the CLI) a failure comes out as one RankFailed line: which rank, why (its exception, its exit
code, the signal that killed it) and where it was, read from the state each rank leaves behind
(paraflow/errors.py), since a rank killed from outside cannot say so itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
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
from paraflow.errors import (
    STATE_DIR_ENV,
    ParaflowError,
    RankFailed,
    one_line_cause,
    record_failure,
    set_stage,
    stop_tracking,
    track_rank,
    tracked_rank,
    where_now,
)
from paraflow.failures import exit_codes_of, explain_spawned_failure, this_rank_failed
from paraflow.validate import resolve_accelerator

T = TypeVar("T")
Worker = Callable[[ParallelContext, DictConfig], T]


def processes_created_externally() -> bool:
    """True under torchrun (TorchElastic) or a multi-task SLURM job, as Fabric detects them (a
    SLURM job named 'bash' or 'interactive' is not one: Fabric leaves those to other launchers)."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return True
    return int(os.environ.get("SLURM_NTASKS", "1")) > 1 and \
        os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")


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
    """This rank's context for the run `cfg`: a communicator of its own (its own byte count);
    the strategy's mesh is built by its setup (paraflow.mesh.mesh_of). Several runs in one
    launch (tests, benchmarks) call it once per run."""
    group = dist.group.WORLD if world_size > 1 else None
    timeout = timedelta(seconds=float(cfg.launcher.timeout_s))
    comm = Communicator(group, world_size, rank, link_model(cfg), timeout=timeout)
    return ParallelContext(rank, world_size, local_rank, device, comm)


def _from_rank_0(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (a collective)."""
    box = [obj if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _on_rank(fabric: Fabric, worker: Worker[T], cfg_dict: dict[str, Any],
             state_dir: str | None = None, quiet: bool = False,
             result_file: str | None = None) -> T | None:
    track_rank(fabric.global_rank, state_dir)
    previous_threads = torch.get_num_threads()
    joined = fabric.world_size > 1 and processes_created_externally()
    try:
        if joined and "output_dir" in cfg_dict:
            # Every rank ran Hydra itself, each with its own run folder: rank 0's is the run's.
            cfg_dict = {**cfg_dict, "output_dir": _from_rank_0(cfg_dict["output_dir"])}
        cfg = OmegaConf.create(cfg_dict)
        torch.set_num_threads(threads_for_rank(cfg))
        ctx = rank_context(cfg, fabric.global_rank, fabric.world_size, fabric.local_rank,
                           fabric.device)
        set_stage("before denoise")  # model loading, prompt encoding (the denoise stage says more)
        result = worker(ctx, cfg)
        set_stage("after the run")
        if joined:
            result = _from_rank_0(result)  # nobody else returns it to these ranks
        if fabric.world_size > 1:
            # Leave together: a rank that tears down its groups while a peer's transport threads
            # still talk to it can abort the peer at exit ("terminate called without an active
            # exception"), seen once in CI.
            dist.barrier()
        if result_file is not None:  # spawned: the result goes back through a file
            if fabric.global_rank == 0:
                Path(result_file).write_bytes(pickle.dumps(result))
            return None
        return result
    except BaseException as err:
        if isinstance(err, Exception):  # an exit (SystemExit) is reported by its exit code
            record_failure(err)  # for the launcher's one-line report
        if not quiet:
            # Each failing rank says why: the launcher may report a peer's "connection closed"
            # first, which hides the cause.
            print(f"paraflow: rank {fabric.global_rank} failed: {type(err).__name__}: {err}",
                  file=sys.stderr, flush=True)
        raise
    finally:
        stop_tracking()
        torch.set_num_threads(previous_threads)
        if fabric.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def launch(cfg: DictConfig, worker: Worker[T], explain: bool = False) -> T:
    """Run `worker(ctx, cfg)` on every rank; return rank 0's result (on every rank under torchrun
    or SLURM). `explain=True`: a failed rank raises RankFailed, one line a user can read (see
    the module's docstring); otherwise each failing rank prints its error and the launch raises
    what torch.multiprocessing raises (ProcessRaisedException, ProcessExitedException)."""
    accelerator = resolve_accelerator(cfg)
    devices, num_nodes = int(cfg.launcher.devices), int(cfg.launcher.num_nodes)
    external = processes_created_externally()
    if devices * num_nodes > 1 and _IS_INTERACTIVE and not external:
        return _launch_from_a_script(cfg, worker, explain)
    strategy: Any = "auto"
    if devices * num_nodes > 1:
        strategy = DDPStrategy(
            start_method="popen" if external else "spawn",
            process_group_backend="nccl" if accelerator == "cuda" else "gloo",
            timeout=timedelta(seconds=float(cfg.launcher.timeout_s)),
        )
    fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes,
                    strategy=strategy)
    cfg_dict = plain_dict(cfg)
    spawned = devices * num_nodes > 1 and not external
    if not explain:
        return _run(fabric, partial(_on_rank, worker=worker, cfg_dict=cfg_dict), spawned)
    if devices * num_nodes == 1:
        try:
            return _run(fabric, partial(_on_rank, worker=worker, cfg_dict=cfg_dict), spawned)
        except (ParaflowError, RankFailed):
            raise
        except Exception as err:  # one line naming the stage and the cause, as for many ranks
            raise RankFailed(this_rank_failed(0, where_now(), one_line_cause(err)), 0) from err
    from torch.multiprocessing.spawn import ProcessException

    # torch logs "Terminating process N via signal SIGTERM" for each peer it stops after a
    # failure; the RankFailed line says what happened.
    spawn_log = logging.getLogger("torch.multiprocessing.spawn")
    with _state_folder(external) as state_dir, _log_level(spawn_log, logging.ERROR):
        try:
            return _run(fabric, partial(_on_rank, worker=worker, cfg_dict=cfg_dict,
                                        state_dir=state_dir, quiet=True), spawned)
        except ProcessException as err:  # a spawned rank failed; all of them are gone now
            codes = exit_codes_of(err)
            # Let go of the launch's locals (Fabric's result queue), or its semaphores outlive
            # the run and multiprocessing warns of "leaked semaphore objects" at exit.
            traceback.clear_frames(err.__traceback__)
            message, rank = explain_spawned_failure(err, state_dir, devices * num_nodes, codes)
            raise RankFailed(message, rank) from err
        except Exception as err:
            if not external:
                raise
            tracked = tracked_rank()
            rank = fabric.global_rank if tracked is None else tracked
            raise RankFailed(this_rank_failed(rank, where_now(), one_line_cause(err)),
                             rank) from err


@contextlib.contextmanager
def _own_rendezvous() -> Iterator[None]:
    """Fabric writes the address and port it picks for spawned ranks into os.environ and would
    reuse them for every later launch, and every child process would inherit them; by then a
    RankPool (paraflow.pool) or another program may hold the port. Take them out again after
    the launch (those the user set stay)."""
    set_before = {k for k in ("MASTER_ADDR", "MASTER_PORT") if k in os.environ}
    try:
        yield
    finally:
        for key in {"MASTER_ADDR", "MASTER_PORT"} - set_before:
            os.environ.pop(key, None)


def _run(fabric: Fabric, on_rank: Callable[..., Any], spawned: bool) -> Any:
    """fabric.launch(on_rank). Spawned ranks hand rank 0's result back in a file: Fabric's
    return queue is read only after every rank has exited, and a result larger than the pipe's
    buffer (a benchmark's many records) would block rank 0's exit forever."""
    if not spawned:
        return fabric.launch(on_rank)
    with _own_rendezvous(), tempfile.TemporaryDirectory(prefix="paraflow-result-") as tmp:
        result = Path(tmp) / "result.pkl"
        fabric.launch(partial(on_rank, result_file=str(result)))
        return pickle.loads(result.read_bytes())


@contextlib.contextmanager
def _log_level(logger: logging.Logger, level: int) -> Iterator[None]:
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)


@contextlib.contextmanager
def _state_folder(external: bool) -> Iterator[str | None]:
    """Where the ranks leave their state: $PARAFLOW_STATE_DIR if set (kept), else a temporary
    folder for spawned ranks (removed after); ranks started by torchrun or SLURM report their
    own failures from memory and need none."""
    chosen = os.environ.get(STATE_DIR_ENV)
    if chosen:
        Path(chosen).mkdir(parents=True, exist_ok=True)
        yield chosen
    elif external:
        yield None
    else:
        with tempfile.TemporaryDirectory(prefix="paraflow-ranks-") as tmp:
            yield tmp


def _launch_from_a_script(cfg: DictConfig, worker: Worker[T], explain: bool = False) -> T:
    """Fabric will not spawn ranks from an interactive interpreter (a notebook, a REPL), so there
    the launch runs in a child `python -m paraflow.launcher`, and its result comes back pickled."""
    with tempfile.TemporaryDirectory(prefix="paraflow-launch-") as tmp:
        job, result = Path(tmp) / "job.pkl", Path(tmp) / "result.pkl"
        job.write_bytes(pickle.dumps((plain_dict(cfg), worker, explain)))
        proc = subprocess.run([sys.executable, "-m", "paraflow.launcher", str(job), str(result)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            if result.exists():  # the child's RankFailed: (message, rank)
                message, rank = pickle.loads(result.read_bytes())
                raise RankFailed(message, rank)
            raise RuntimeError(f"the ranks failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        return cast(T, pickle.loads(result.read_bytes()))


if __name__ == "__main__":  # the child of _launch_from_a_script
    from paraflow import launcher as _module  # by its importable name, for the spawned ranks

    _cfg_dict, _worker, _explain = pickle.loads(Path(sys.argv[1]).read_bytes())
    try:
        _result = _module.launch(OmegaConf.create(_cfg_dict), _worker, _explain)
    except RankFailed as _failed:
        Path(sys.argv[2]).write_bytes(pickle.dumps((str(_failed), _failed.rank)))
        sys.exit(1)
    Path(sys.argv[2]).write_bytes(pickle.dumps(_result))
