"""The benchmark command on a tiny grid, as a user runs it (a subprocess, Hydra overrides)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_module
from omegaconf import DictConfig

from paraflow.api import CONF_DIR, compose
from paraflow.bench.grid import grid
from paraflow.bench.report import commit, write_figure

from .conftest import REPO

PRESETS = sorted(p.stem for p in (CONF_DIR / "bench" / "preset").glob("*.yaml"))


def bench_config(overrides: list[str]) -> DictConfig:
    with initialize_config_module("paraflow.conf.bench", version_base="1.3"):
        return hydra_compose("bench", overrides=overrides)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_into_runnable_cells(preset: str) -> None:
    bench = bench_config([f"preset={preset}"])
    cells = grid(bench)
    assert cells[0].strategy == "single" and len(cells) > 1
    for cell in cells:  # every cell is a valid run config
        cfg = compose(cell.overrides(bench))
        assert cfg.launcher.devices == cell.ranks


def test_patch_preset_has_every_groupnorm_mode_on_both_links() -> None:
    cells = grid(bench_config(["preset=patch"]))
    modes = {c.strategy for c in cells if c.strategy.startswith("displaced")}
    assert modes == {f"displaced {m}" for m in ("corrected_async", "weighted", "stale", "sync",
                                                "separate")}
    assert {c.link for c in cells if c.strategy == "sync_patch"} == {"real", "16 GB/s 10 us"}
    modeled = next(c for c in cells if c.link != "real")
    cfg = compose(modeled.overrides(bench_config(["preset=patch"])))
    assert cfg.launcher.link.bandwidth_gb_s == 16 and cfg.launcher.link.latency_us == 10


def test_grid_lists_baselines_then_layouts() -> None:
    bench = bench_config(["sizes=[64]", "ranks=[1,2,3]", "steps=[4]",
                          "strategies=[sync_patch,tensor]"])
    names = [cell.name for cell in grid(bench)]
    assert names == ["single 1x1 64px 4st", "single 1x2 64px 4st", "single 1x3 64px 4st",
                     "sync_patch 2x1 64px 4st", "tensor 2x1 64px 4st",
                     "sync_patch 3x1 64px 4st", "tensor 3x1 64px 4st"]
    bench.prompts = ["a red circle on the left, blue background", "it's a square"]
    cfg = compose(grid(bench)[3].overrides(bench))
    assert list(cfg.prompt) == list(bench.prompts)  # commas and quotes stay inside a prompt
    assert cfg.strategy.name == "sync_patch" and cfg.launcher.devices == 2


@pytest.mark.slow
def test_bench_command_writes_table_csv_json_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "grid"
    args = ["sizes=[64]", "ranks=[1,2,3]", "steps=[3]", "strategies=[sync_patch,data,tensor]",
            "repeats=1", "memory_pass=false", "images_per_prompt=2", "cost.device_hour=3.6",
            f"hydra.run.dir={out}"]
    proc = subprocess.run([sys.executable, "-m", "paraflow.bench", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = json.loads((out / "bench.json").read_text())
    assert written["command"] == shlex.join(["python", "-m", "paraflow.bench", *args])
    rows = {(r["strategy"], r["ranks"], r["threads_per_rank"]): r for r in written["rows"]}
    print((out / "bench.md").read_text())
    assert rows[("single", 1, 1)]["speedup"] == 1.0
    assert rows[("data", 2, 1)]["max_pixel_diff"] <= 1  # same seeds; batching may round apart
    assert rows[("sync_patch", 2, 1)]["psnr_db"] > 40
    assert rows[("sync_patch", 2, 1)]["bytes_per_step_per_rank"] > 0
    assert rows[("data", 2, 1)]["bytes_per_step_per_rank"] == 0
    for row in (rows[("single", 1, 1)], rows[("data", 2, 1)]):  # 3.6 per device-hour
        assert row["cost_per_image"] == pytest.approx(
            3.6 * row["ranks"] * row["latency_s"] / 3600 / row["images"])
    # The tiny model has 4 attention heads: tensor parallelism over 3 ranks cannot run.
    assert rows[("tensor", 3, 1)]["status"].startswith("skipped: ") and "allows: 1, 2, 4" in \
        rows[("tensor", 3, 1)]["status"]
    for name in ("bench.csv", "bench.md", "latency.png", "speedup.png", "bytes_per_image.png",
                 "psnr.png", "speed_quality.png"):
        assert (out / name).stat().st_size > 0, name
    assert "sync_patch" in (out / "bench.csv").read_text()


def test_a_figure_names_its_command_and_commit(tmp_path: Path) -> None:
    """A table for docs/ carries the command line that wrote it and the commit it ran at."""
    path = tmp_path / "figures" / "plan.md"
    write_figure(path, "python -m paraflow.plan model=tiny", "| a |\n|---|\n| 1 |\n",
                 measured=False)
    text = path.read_text()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                          capture_output=True).stdout.strip()
    assert "`python -m paraflow.plan model=tiny`" in text
    assert commit().startswith(head or "unknown") and f"`{head or 'unknown'}`" in text
    assert text.rstrip().endswith("| 1 |") and "CPU" not in text  # a plan: no machine
