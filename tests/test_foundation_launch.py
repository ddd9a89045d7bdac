"""Several gloo ranks on CPU: data parallelism against single-device runs, byte counting,
failures that take the run down, and Hydra sweeps with several ranks."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.multiprocessing import ProcessRaisedException

from paraflow.api import compose
from paraflow.launcher import launch

from . import workers
from .conftest import REPO, read_images, read_latents, run_cli, run_paraflow
from .pools import run_pooled

pytestmark = pytest.mark.slow  # multi-process launches of whole runs

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow star", "a white ring"]
TWO_RANKS = ["+strategy=data", "launcher.devices=2", "launcher.threads_per_rank=1"]


def prompt_list(prompts: list[str]) -> str:
    return "prompt=[" + ",".join(f"'{p}'" for p in prompts) + "]"


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Each prompt alone on one device (the reference)."""
    root = tmp_path_factory.mktemp("single")
    runs = []
    for i, prompt in enumerate(PROMPTS):
        # Image i of a multi-prompt run draws its noise with seed + i.
        run_paraflow(root / str(i), [f"prompt='{prompt}'", f"seed={i}", "save_latents=true"])
        runs.append(root / str(i))
    return runs


@pytest.mark.parametrize("n_prompts", [4, 5])
def test_data_parallel_equals_single_device(n_prompts: int, single_runs: list[Path],
                                            tmp_path: Path) -> None:
    result = run_paraflow(tmp_path, [*TWO_RANKS, prompt_list(PROMPTS[:n_prompts]),
                                     "save_latents=true"])
    assert result["world_size"] == 2 and result["strategy"] == "data"
    assert result["images_per_rank"] == [(n_prompts + 1) // 2, n_prompts // 2]
    latents = read_latents(tmp_path)
    images = read_images(tmp_path)
    assert len(images) == n_prompts
    for i in range(n_prompts):
        # Batched, other thread count: equal up to float reassociation (tol 1e-4, |x| ~ 5).
        assert torch.allclose(latents[i], read_latents(single_runs[i])[0], atol=1e-4)
        diff = np.abs(images[i].astype(int) - read_images(single_runs[i])[0].astype(int))
        assert diff.max() <= 1
    record = json.loads((tmp_path / "run.json").read_text())
    assert len(record["comm_bytes"]) == 2 and all(b > 0 for b in record["comm_bytes"])
    assert len(record["peak_memory_bytes"]) == 2 and record["config"]["launcher"]["devices"] == 2


def test_images_per_prompt_and_more_ranks_than_images(tmp_path: Path) -> None:
    result = run_paraflow(tmp_path, ["+strategy=data", "launcher.devices=3",
                                     "launcher.threads_per_rank=1", "prompt='a red circle'",
                                     "images_per_prompt=2"])
    assert result["images_per_rank"] == [1, 1, 0]
    first, second = read_images(tmp_path)
    assert np.abs(first.astype(int) - second.astype(int)).max() > 0  # seeds differ per image


def test_same_run_twice_is_identical(tmp_path: Path) -> None:
    for name in ("a", "b"):
        run_paraflow(tmp_path / name, [*TWO_RANKS, prompt_list(PROMPTS[:2]), "save_latents=true"])
    assert torch.equal(read_latents(tmp_path / "a"), read_latents(tmp_path / "b"))
    for x, y in zip(read_images(tmp_path / "a"), read_images(tmp_path / "b")):
        assert np.array_equal(x, y)


def test_communicator_counts_bytes_per_step() -> None:
    cfg = compose(["launcher.devices=2", "launcher.threads_per_rank=1"])
    tally = run_pooled(cfg, workers.count_bytes)
    # all_gather: 10 fp32 × (W-1) = 40; all_reduce: 2·64·(W-1)/W = 64; uneven gather of int64:
    # the size exchange (8 bytes) then the padded piece (max 2 items → 16 bytes).
    assert tally == {0: 40, 1: 64 + 8 + 16}


def test_kept_ranks_run_many_jobs_and_a_failed_job_ends_them_in_one_line() -> None:
    """The session's 2-rank pool (tests/pools.py): jobs run on the same processes; a job whose
    rank exits raises the launcher's line, and the next job gets fresh ranks."""
    from paraflow.errors import RankFailed

    cfg = compose(["launcher.devices=2", "launcher.threads_per_rank=1", "launcher.timeout_s=20"])
    pids = run_pooled(cfg, workers.rank_pids)
    assert len(set(pids)) == 2 and run_pooled(cfg, workers.rank_pids) == pids
    with pytest.raises(RankFailed) as failed:
        run_pooled(cfg, workers.exit_on_rank_1)
    assert str(failed.value) == "rank 1 exited with code 3 during denoise step 2 of 5"
    assert failed.value.rank == 1
    fresh = run_pooled(cfg, workers.rank_pids)
    assert len(set(fresh)) == 2 and not set(fresh) & set(pids)


def test_stalled_rank_times_out_instead_of_hanging() -> None:
    cfg = compose(["launcher.devices=2", "launcher.threads_per_rank=1", "launcher.timeout_s=3"])
    start = time.perf_counter()
    with pytest.raises(ProcessRaisedException):
        launch(cfg, workers.stall_on_rank_1)
    assert time.perf_counter() - start < 60


def test_failing_rank_takes_the_cli_run_down(tmp_path: Path) -> None:
    out = tmp_path / "run"
    start = time.perf_counter()
    result = run_cli([*TWO_RANKS, prompt_list(PROMPTS[:4]), "steps=2", f"hydra.run.dir={out}"],
                     env={"PARAFLOW_FAIL_RANK": "1"}, timeout=120)
    elapsed = time.perf_counter() - start
    assert result.returncode != 0
    assert "injected failure on rank 1" in result.stderr
    assert elapsed < 90, f"took {elapsed:.0f}s to fail"
    assert not (out / "images").exists() and not (out / "run.json").exists()


def test_cli_sweep_with_two_ranks(tmp_path: Path) -> None:
    """A Hydra `-m` sweep of 2-rank runs (a single CLI run on 2 ranks: test_patch_config's)."""
    sweep = run_cli(["-m", *TWO_RANKS, prompt_list(PROMPTS[:2]), "steps=2", "seed=0,7",
                     "pipeline.progress=false", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert sweep.returncode == 0, sweep.stderr
    records = [json.loads((tmp_path / "sweep" / j / "run.json").read_text()) for j in "01"]
    assert [r["config"]["seed"] for r in records] == [0, 7]
    assert all(r["world_size"] == 2 and r["images_per_rank"] == [1, 1] for r in records)
    # Job 0 of the sweep is the same run as the API's with the same overrides.
    run_paraflow(tmp_path / "run", [*TWO_RANKS, prompt_list(PROMPTS[:2]), "steps=2"])
    assert len(read_images(tmp_path / "run")) == 2
    for x, y in zip(read_images(tmp_path / "run"), read_images(tmp_path / "sweep" / "0")):
        assert np.array_equal(x, y)


def test_a_large_result_comes_back_without_blocking_the_ranks() -> None:
    """Fabric reads its return queue only after the ranks exit: a result over the pipe's buffer
    must not go through it (it hung a 50-run benchmark). In a subprocess, so a hang fails."""
    code = ("from paraflow.api import compose; from paraflow.launcher import launch; "
            "from tests import workers; "
            "r = launch(compose(['launcher.devices=2', 'launcher.threads_per_rank=1']), "
            "workers.big_result); print(len(r), r[:1] == bytes([0]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, text=True,
                          capture_output=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-2:] == [str(4 << 20), "True"]
