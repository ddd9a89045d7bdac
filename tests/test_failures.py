"""A rank that is killed, exits or raises: the run exits non-zero with one short line naming the
rank, the cause and where it was, no traceback (unless HYDRA_FULL_ERROR=1), and no outputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from paraflow.api import compose
from paraflow.errors import RankFailed
from paraflow.failures import explain_spawned_failure
from paraflow.launcher import launch

from . import workers

pytestmark = pytest.mark.slow

TWO_RANKS = ["+strategy=data", "launcher.devices=2", "launcher.threads_per_rank=1",
             "model=tiny_random", "pipeline.progress=false",
             "prompt=['a red circle','a blue square']"]


def cli(args: list[str], cwd: Path, **env: str) -> subprocess.Popen[str]:
    """`python -m paraflow ARGS`, run from `cwd` (outside the checkout), in its own session."""
    plain = {k: v for k, v in os.environ.items()
             if k not in ("PARAFLOW_FAIL_RANK", "PARAFLOW_STATE_DIR", "HYDRA_FULL_ERROR")}
    return subprocess.Popen([sys.executable, "-m", "paraflow", *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**plain, **env}, start_new_session=True)


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
        pytest.fail(f"the run did not end in {timeout}s:\n{err[-3000:]}")
    finally:
        try:  # the ranks are in the CLI's group: none may outlive the test
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return int(proc.returncode), err


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("paraflow: error")]


def test_rank_killed_from_outside_is_named_with_signal_and_step(tmp_path: Path) -> None:
    state, run_dir = tmp_path / "state", tmp_path / "run"
    # Many steps: rank 1 is killed long before the end.
    proc = cli([*TWO_RANKS, "steps=500", f"hydra.run.dir={run_dir}"], tmp_path,
               PARAFLOW_STATE_DIR=str(state))
    try:
        deadline, rank_1 = time.monotonic() + 120, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                rank_1 = json.loads((state / "rank-1.json").read_text())
            except (OSError, ValueError):
                rank_1 = None
            if rank_1 and rank_1.get("stage") == "denoise" and rank_1["step"] >= 1:
                break
            time.sleep(0.1)
        assert rank_1 and rank_1.get("stage") == "denoise", f"rank 1 not in denoise: {rank_1}"
        os.kill(int(rank_1["pid"]), signal.SIGKILL)  # as the OOM killer would
    finally:
        code, stderr = finish(proc)
    assert code != 0
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr
    assert "rank 1" in lines[0] and "SIGKILL" in lines[0] and "denoise step" in lines[0], lines
    assert "Traceback" not in stderr, stderr
    assert not (run_dir / "images").exists() and not (run_dir / "run.json").exists()


def test_rank_that_raises_gives_one_line_without_traceback(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    code, stderr = finish(cli([*TWO_RANKS, "steps=2", f"hydra.run.dir={run_dir}"], tmp_path,
                              PARAFLOW_FAIL_RANK="1"))
    assert code == 1
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr
    assert lines[0].startswith("paraflow: error: rank 1 failed")
    assert "RuntimeError: injected failure on rank 1 (PARAFLOW_FAIL_RANK)" in lines[0]
    assert "Traceback" not in stderr, stderr
    assert not (run_dir / "images").exists()


def test_one_device_failure_gives_one_line_without_traceback(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    code, stderr = finish(cli(["model=tiny_random", "steps=2", "pipeline.progress=false",
                               f"hydra.run.dir={run_dir}"], tmp_path, PARAFLOW_FAIL_RANK="0"))
    assert code == 1
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr
    assert lines[0].startswith("paraflow: error: rank 0 failed")
    assert "RuntimeError: injected failure on rank 0" in lines[0]
    assert "Traceback" not in stderr, stderr
    assert not (run_dir / "images").exists()


def test_hydra_full_error_shows_the_traceback(tmp_path: Path) -> None:
    code, stderr = finish(cli([*TWO_RANKS, "steps=2", f"hydra.run.dir={tmp_path / 'run'}"],
                              tmp_path, PARAFLOW_FAIL_RANK="1", HYDRA_FULL_ERROR="1"))
    assert code != 0
    assert "Traceback" in stderr and "RankFailed" in stderr
    assert "injected failure on rank 1" in stderr  # the rank's own traceback, chained


def test_rank_that_exits_is_named_with_its_exit_code() -> None:
    cfg = compose(["launcher.devices=2", "launcher.threads_per_rank=1", "launcher.timeout_s=20"])
    start = time.perf_counter()
    with pytest.raises(RankFailed) as failed:
        launch(cfg, workers.exit_on_rank_1, explain=True)
    assert str(failed.value) == "rank 1 exited with code 3 during denoise step 2 of 5"
    assert failed.value.rank == 1
    assert time.perf_counter() - start < 60


def _state(directory: Path, rank: int, pid: int, where: str, error: str | None = None) -> None:
    (directory / f"rank-{rank}.json").write_text(json.dumps({"rank": rank, "pid": pid,
                                                             "where": where}).ljust(256))
    if error is not None:
        (directory / f"rank-{rank}.error").write_text(error)


def test_the_rank_that_caused_it_is_named_not_the_one_that_noticed(tmp_path: Path) -> None:
    from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

    # Rank 0 exited first, only because rank 1 went away: rank 1's own error is the cause.
    _state(tmp_path, 0, 100, "during denoise step 4 of 9",
           "RuntimeError: [pair.cc:1] Connection closed by peer [127.0.0.1]:1. This is ...")
    _state(tmp_path, 1, 101, "during decode", "ValueError: bad shape")
    raised = ProcessRaisedException("trace", error_index=0, error_pid=100)
    assert explain_spawned_failure(raised, str(tmp_path), 2) == \
        ("rank 1 failed during decode: ValueError: bad shape", 1)
    # A rank killed from outside is the cause, whatever its peers say afterwards.
    (tmp_path / "rank-1.error").unlink()
    killed = ProcessExitedException("x", error_index=1, error_pid=101, exit_code=-9,
                                    signal_name="SIGKILL")
    assert explain_spawned_failure(killed, str(tmp_path), 2) == \
        ("rank 1 was killed by SIGKILL during decode", 1)
    # ... also when the peer that noticed was reported first: the exit codes show the kill.
    codes = {0: (100, 1), 1: (101, -9)}
    assert explain_spawned_failure(raised, str(tmp_path), 2, codes) == \
        ("rank 1 was killed by SIGKILL during decode", 1)
    # Only peers' complaints (the others stopped by the launch's SIGTERM): the first rank to
    # fail is named, shortly.
    message, rank = explain_spawned_failure(raised, str(tmp_path), 2, {0: (100, 1), 1: (101, -15)})
    assert rank == 0 and message == ("rank 0 stopped during denoise step 4 of 9: another rank "
                                     "is gone or stalled (RuntimeError: Connection closed by "
                                     "peer [127.0.0.1]:1.)")
