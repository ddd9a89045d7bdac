"""A strategy from another package (tests/outside_plugin, never named in paraflow/): installed
with pip into a scratch folder, it is found through the entry-point groups, composes with its own
schema, is validated before launch, runs on 2 ranks, is planned, and runs in a benchmark grid.
Every run is a subprocess with the scratch folder on PYTHONPATH (nothing is installed into the
test's environment)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, install_outside, read_images

pytestmark = pytest.mark.slow
RUN = ["model=tiny_random", "height=64", "width=64", "steps=3", "pipeline.progress=false",
       "launcher.threads_per_rank=1"]


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return install_outside("outside_plugin", tmp_path_factory.mktemp("plugin"))


def _paraflow(plugin: Path, cwd: Path, *args: str,
              module: str = "paraflow") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(plugin)}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=600)


def test_paraflow_does_not_name_the_plugin() -> None:
    for path in (REPO / "paraflow").rglob("*.py"):
        assert "round_robin" not in path.read_text(), path


def test_the_plugin_runs_on_two_ranks_like_one_device(plugin_path: Path, tmp_path: Path) -> None:
    prompts = "prompt=[a red circle,a blue square,a green triangle]"
    proc = _paraflow(plugin_path, tmp_path, *RUN, prompts, "+strategy=round_robin",
                     "strategy.reverse=true", "launcher.devices=2", "output_dir=plugin")
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((tmp_path / "plugin" / "run.json").read_text())
    assert record["strategy"] == "round_robin"
    assert record["strategy_mode"] == "round_robin reverse"
    assert record["images_per_rank"] == [1, 2]  # reverse: rank 1 deals first (images 0 and 2)
    single = _paraflow(plugin_path, tmp_path, *RUN, prompts, "output_dir=single")
    assert single.returncode == 0, single.stderr[-2000:]
    for got, want in zip(read_images(tmp_path / "plugin"), read_images(tmp_path / "single")):
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # a batch of 1 vs 3


def test_the_plugin_schema_and_validation_refuse_bad_input(plugin_path: Path,
                                                            tmp_path: Path) -> None:
    typo = _paraflow(plugin_path, tmp_path, *RUN, "+strategy=round_robin", "strategy.revers=true")
    assert typo.returncode != 0 and "revers" in typo.stderr
    few = _paraflow(plugin_path, tmp_path, *RUN, "+strategy=round_robin", "launcher.devices=2",
                    "prompt=a red circle")
    assert few.returncode == 2
    assert "round_robin: 1 image(s) for 2 ranks" in few.stderr
    assert not any(tmp_path.rglob("*.png"))


def test_the_plugin_is_planned(plugin_path: Path, tmp_path: Path) -> None:
    proc = _paraflow(plugin_path, tmp_path, *RUN, "+strategy=round_robin", "launcher.devices=2",
                     "prompt=[a,b,c]", "plan_only=true", "hydra.run.dir=plan")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "round_robin rank 1/2" in proc.stdout
    assert "planned by replaying its own setup" in proc.stdout


def test_the_plugin_runs_in_a_benchmark_grid(plugin_path: Path, tmp_path: Path) -> None:
    proc = _paraflow(plugin_path, tmp_path, "strategies=[round_robin]", "sizes=[64]",
                     "ranks=[1,2]", "steps=[2]", "repeats=1", "memory_pass=false",
                     "thread_baselines=false", "prompts=[a,b]", "hydra.run.dir=grid",
                     module="paraflow.bench")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "grid" / "bench.json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    plugin = [r for r in rows if r["strategy"] == "round_robin"]
    assert plugin and plugin[0]["status"] == "ok" and plugin[0]["ranks"] == 2
