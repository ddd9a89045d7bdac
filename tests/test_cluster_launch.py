"""Ranks started from outside (torchrun, SLURM), on loopback: every process exits 0, rank 0
alone writes, into one run folder, and the result equals the same run spawned the normal way."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from .conftest import read_images, read_latents, run_paraflow

pytestmark = pytest.mark.slow

PROMPTS = "prompt=['a red circle','a blue square']"  # two images: both ranks make one
RUN = ["model=tiny_random", "height=64", "width=64", "steps=3", "launcher.threads_per_rank=1",
       "pipeline.progress=false", "save_latents=true", "launcher.timeout_s=60", PROMPTS]
WAIT_S = 150  # per launch; a run takes ~10 s here


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(tmp: Path, **extra: str) -> dict[str, str]:
    """This environment without any launcher's variables, with its own temp folder."""
    launcher_vars = ("TORCHELASTIC_", "SLURM_", "PARAFLOW_")
    plain = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK",
             "MASTER_ADDR", "MASTER_PORT", "HYDRA_FULL_ERROR")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(launcher_vars) and k not in plain}
    tmp.mkdir(parents=True, exist_ok=True)
    return {**env, "TMPDIR": str(tmp), **extra}


@contextmanager
def started(commands: Sequence[tuple[list[str], dict[str, str]]], cwd: Path,
            logs: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Start each (argv, env) in its own session, output to logs/N.out|err; at the end every
    process group still there is killed, whatever happened."""
    logs.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i, (argv, env) in enumerate(commands):
            with open(logs / f"{i}.out", "wb") as out, open(logs / f"{i}.err", "wb") as err:
                procs.append(subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=err,
                                              start_new_session=True))
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        for proc in procs:  # torchrun's workers are in the agent's group; make sure
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def wait_all(procs: Sequence[subprocess.Popen[bytes]], logs: Path) -> list[int]:
    deadline = time.monotonic() + WAIT_S
    for proc in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"a launch did not finish in {WAIT_S}s; logs: {describe(logs)}")
    return [int(proc.returncode) for proc in procs]


def describe(logs: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                     for p in sorted(logs.iterdir()))


def only_run_dir(cwd: Path) -> Path:
    """The one folder the launch left under outputs/ (each rank ran Hydra; one folder is kept)."""
    runs = sorted((cwd / "outputs").glob("*/*"))
    assert len(runs) == 1, f"expected one run folder, found {runs}"
    assert sorted((cwd / "outputs").iterdir()) == [runs[0].parent]
    return runs[0]


def assert_no_private_dirs(tmp: Path) -> None:
    left = sorted(p.name for p in tmp.glob("paraflow-*"))
    assert not left, f"ranks left temporary folders behind: {left}"


@pytest.fixture(scope="module")
def spawned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same runs with the ranks spawned by paraflow itself (launcher.devices=2)."""
    root = tmp_path_factory.mktemp("spawned")
    runs = {}
    for strategy in ("data", "sync_patch"):
        run_paraflow(root / strategy, [f"+strategy={strategy}", "launcher.devices=2", *RUN])
        runs[strategy] = root / strategy
    return runs


def assert_same_run(run_dir: Path, reference: Path, strategy: str) -> None:
    record = json.loads((run_dir / "run.json").read_text())
    assert record["world_size"] == 2 and record["strategy"] == strategy
    latents, expected = read_latents(run_dir), read_latents(reference)
    # data: another launch of the same batches (tol as tests/test_foundation_launch.py);
    # sync_patch: exact parallelism, equal within 1e-4.
    assert torch.allclose(latents, expected, atol=1e-4), float((latents - expected).abs().max())
    images, expected_images = read_images(run_dir), read_images(reference)
    assert len(images) == len(expected_images) == 2
    for x, y in zip(images, expected_images):
        assert np.abs(x.astype(int) - y.astype(int)).max() <= 1


@pytest.mark.parametrize("strategy", ["data", "sync_patch"])
def test_torchrun_two_nodes_equals_a_spawned_run(strategy: str, spawned: dict[str, Path],
                                                 tmp_path: Path) -> None:
    cwd, tmp, logs = tmp_path / "work", tmp_path / "tmp", tmp_path / "logs"
    cwd.mkdir()
    port = free_port()
    agents = []
    for node in (0, 1):
        argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                "--node-rank", str(node), "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-conf", "join_timeout=60",
                "-m", "paraflow", f"+strategy={strategy}", "launcher.devices=1",
                "launcher.num_nodes=2", *RUN]
        agents.append((argv, clean_env(tmp)))
    with started(agents, cwd, logs) as procs:
        codes = wait_all(procs, logs)
    assert codes == [0, 0], describe(logs)
    run_dir = only_run_dir(cwd)
    assert_same_run(run_dir, spawned[strategy], strategy)
    summaries = [(logs / f"{i}.out").read_text().count("image(s) in") for i in (0, 1)]
    assert summaries == [1, 0], describe(logs)  # rank 0 (node 0) alone prints the summary
    assert str(run_dir) in (logs / "0.out").read_text()
    assert_no_private_dirs(tmp)


def test_slurm_tasks_equal_a_spawned_run(spawned: dict[str, Path], tmp_path: Path) -> None:
    """Two tasks as srun would start them (Fabric's SLURMEnvironment reads only environment
    variables, so no srun is needed): SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID, ..."""
    cwd, tmp, logs = tmp_path / "work", tmp_path / "tmp", tmp_path / "logs"
    cwd.mkdir()
    job = {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1",
           "SLURM_NODEID": "0", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "paraflow-test",
           "SLURM_NODELIST": "localhost", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    argv = [sys.executable, "-m", "paraflow", "+strategy=data", "launcher.devices=2", *RUN]
    tasks = [(argv, clean_env(tmp, **job, SLURM_PROCID=str(r), SLURM_LOCALID=str(r)))
             for r in (0, 1)]
    with started(tasks, cwd, logs) as procs:
        codes = wait_all(procs, logs)
    assert codes == [0, 0], describe(logs)
    run_dir = only_run_dir(cwd)
    assert_same_run(run_dir, spawned["data"], "data")
    summaries = [(logs / f"{i}.out").read_text().count("image(s) in") for i in (0, 1)]
    assert summaries == [1, 0], describe(logs)
    assert_no_private_dirs(tmp)
