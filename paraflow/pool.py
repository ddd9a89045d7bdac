"""Ranks launched once and kept for many jobs: a notebook or a test suite that runs many small
multi-device jobs pays the launch (a fresh interpreter per rank importing torch and diffusers,
the process group's rendezvous: seconds each time) once per rank count instead of once per job.

    with RankPool(devices=2) as ranks:
        first = generate(compose([...]), "out/a", ranks=ranks)
        second = generate(compose([...]), "out/b", ranks=ranks)

The ranks are launched by `paraflow.launcher.launch`, as a run's are, from a child process
(`python -m paraflow.pool`: Fabric will not spawn from an interactive interpreter, and a child
keeps the caller's process free of the ranks' process group). Rank 0 takes each job, a picklable
`worker(ctx, cfg)` with its config, from the owner over an authenticated loopback connection and
hands it to its peers; every rank runs it with a fresh context (its own communicator and byte
count, its own mesh), and rank 0 sends the result back. Between jobs the peers wait on a group of
their own whose timeout is a day, so an idle pool never trips the runs' collective timeout.

A job that fails on any rank ends the pool as it ends a run: the launcher stops every rank, and
`run` raises RankFailed with the launcher's one line; the next job starts a fresh pool. The ranks
see the environment and `sys.path` the pool was started with, not later changes.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
from datetime import timedelta
from functools import partial
from multiprocessing.connection import Client, Connection, Listener
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from paraflow.config import plain_dict
from paraflow.context import ParallelContext
from paraflow.errors import RankFailed

IDLE = timedelta(days=1)  # the peers' wait for the next job
FAILED = "paraflow-pool: rank failed:"  # the child's last line when a job failed


class RankPools:
    """One RankPool per rank count, started on first use (a test suite's, a notebook's)."""

    def __init__(self, accelerator: str = "auto") -> None:
        self.accelerator = accelerator
        self.pools: dict[int, RankPool] = {}

    def of(self, devices: int) -> RankPool:
        if devices not in self.pools:
            self.pools[devices] = RankPool(devices, self.accelerator)
        return self.pools[devices]

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()


class RankPool:
    """`devices` ranks on this machine (launcher.accelerator `accelerator`), started on the
    first job. `close()` (or leaving the `with`) stops them."""

    def __init__(self, devices: int, accelerator: str = "auto",
                 start_timeout_s: float = 300) -> None:
        if devices < 2:
            raise ValueError(f"devices={devices}: a pool is for 2 or more ranks")
        self.devices, self.accelerator = devices, accelerator
        self.start_timeout_s = start_timeout_s
        self.jobs_run = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._log: Any = None

    def __enter__(self) -> RankPool:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def run(self, worker: Any, cfg: DictConfig) -> Any:
        """`worker(ctx, cfg)` on every rank; rank 0's result. `cfg.launcher.devices` must be the
        pool's rank count."""
        if int(cfg.launcher.devices) != self.devices or int(cfg.launcher.num_nodes) != 1:
            raise ValueError(f"launcher.devices={cfg.launcher.devices}, "
                             f"num_nodes={cfg.launcher.num_nodes}: this pool runs "
                             f"{self.devices} ranks on one node")
        conn = self._connection(cfg.launcher)
        try:  # a failing rank ends the launch: the connection closes (see _failure)
            conn.send((worker, plain_dict(cfg)))
            result = conn.recv()
        except (EOFError, OSError):
            raise self._failure() from None
        self.jobs_run += 1
        return result

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.send(None)
            except OSError:
                pass
            self._conn.close()
        if self._process is not None:
            try:
                self._process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if self._log is not None:
            self._log.close()
        self._process = self._conn = self._log = None

    def _connection(self, launcher: DictConfig) -> Connection:
        """The open connection to rank 0, or a fresh pool launched with `launcher` (the first
        job's launcher keys: timeout, link model, threads)."""
        if self._conn is not None and self.alive:
            return self._conn
        self.close()
        key = os.urandom(16)
        with Listener(("127.0.0.1", 0), authkey=key) as listener:
            launch_keys = {**plain_dict(launcher), "accelerator": self.accelerator}
            start = {"launcher": launch_keys, "address": listener.address, "authkey": key,
                     "sys_path": sys.path}
            self._log = tempfile.TemporaryFile()
            # Not this process's rendezvous port (a MASTER_PORT set here is what its own
            # launches use): the pool's launch picks one free now.
            env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR")}
            self._process = subprocess.Popen(
                [sys.executable, "-m", "paraflow.pool"], stdin=subprocess.PIPE,
                stdout=self._log, stderr=subprocess.STDOUT, env=env)
            assert self._process.stdin is not None
            self._process.stdin.write(pickle.dumps(start))
            self._process.stdin.close()
            # Listener.accept has no timeout; its socket does (a child that dies before it
            # connects must not hang the owner).
            listener._listener._socket.settimeout(self.start_timeout_s)  # type: ignore[attr-defined]
            try:
                self._conn = listener.accept()
            except OSError:
                raise self._failure() from None
        return self._conn

    def _failure(self) -> RankFailed | RuntimeError:
        """The pool's end, in the launcher's words (its last line)."""
        assert self._process is not None and self._log is not None
        try:
            code = self._process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self._process.kill()
            code = self._process.wait()
        self._log.seek(0)
        lines = self._log.read().decode(errors="replace").strip().splitlines()
        self._conn = None
        self.close()
        said = [line for line in lines if line.startswith(FAILED)]  # (warnings may follow)
        if said:  # "<FAILED> <rank> <the launcher's line>"
            rank, message = said[-1].removeprefix(FAILED).strip().split(" ", 1)
            return RankFailed(message, None if rank == "None" else int(rank))
        return RuntimeError(f"the rank pool stopped (exit {code}):\n" + "\n".join(lines[-30:]))


def _serve_jobs(ctx: ParallelContext, cfg: DictConfig, address: Any, authkey: bytes) -> None:
    """Every rank: take the next job from rank 0, run it on a fresh context, until None."""
    import torch.distributed as dist

    from paraflow.launcher import rank_context, threads_for_rank

    control = dist.new_group(backend="gloo", timeout=IDLE)
    conn = Client(address, authkey=authkey) if ctx.is_main else None
    while True:
        box: list[Any] = [None]
        if conn is not None:
            try:
                box = [conn.recv()]
            except EOFError:  # the owner is gone: stop with everyone
                box = [None]
        dist.broadcast_object_list(box, src=0, group=control)
        if box[0] is None:
            return
        worker, cfg_dict = box[0]
        job_cfg = OmegaConf.create(cfg_dict)
        torch.set_num_threads(threads_for_rank(job_cfg))
        fresh = rank_context(job_cfg, ctx.rank, ctx.world_size, ctx.local_rank, ctx.device)
        result = worker(fresh, job_cfg)
        dist.barrier(group=control)  # every rank done before the next job
        if conn is not None:
            conn.send(result)


def _main() -> None:
    from paraflow.launcher import launch

    start = pickle.loads(sys.stdin.buffer.read())
    sys.path[:] = start["sys_path"]  # the owner's: its workers must import here and in the ranks
    cfg = OmegaConf.create({"launcher": start["launcher"]})
    try:
        launch(cfg, partial(_serve_jobs, address=start["address"], authkey=start["authkey"]),
               explain=True)
    except RankFailed as failed:
        print(f"{FAILED} {failed.rank} {failed}", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    _main()
