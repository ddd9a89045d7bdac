"""The training command, a few steps on tiny batches: it writes a stock diffusers pipeline that
paraflow runs, one seed gives one loss curve, and a stopped run resumes onto the same curve."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, read_images, run_paraflow

pytestmark = pytest.mark.slow  # short training runs and subprocesses

SMALL = ["vae_train.steps=2", "vae_train.batch=2", "unet_train.steps=4", "unet_train.batch=2",
         "unet_train.dataset_size=8", "unet_train.warmup=2", "checkpoint_every=2", "samples=0",
         "threads=1"]


def train(out: Path, *extra: str) -> Path:
    result = subprocess.run([sys.executable, "-m", "paraflow.tools.train", *SMALL, *extra,
                             f"hydra.run.dir={out}"], cwd=REPO, text=True, capture_output=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def losses(run: Path, phase: str) -> list[float]:
    with (run / f"loss_{phase}.csv").open() as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(tmp_path_factory.mktemp("train") / "a")


def test_same_seed_same_loss_curve(straight_run: Path, tmp_path: Path) -> None:
    again = train(tmp_path / "b")
    for phase in ("vae", "unet"):
        assert len(losses(straight_run, phase)) == {"vae": 2, "unet": 4}[phase]
        assert losses(again, phase) == losses(straight_run, phase)


def test_stopped_run_resumes_onto_the_same_curve(straight_run: Path, tmp_path: Path) -> None:
    first = train(tmp_path / "first", "stop_after=2")
    assert not (first / "pipeline").exists()  # stopped runs export nothing
    resumed = train(tmp_path / "resumed", f"resume={first / 'checkpoint.pt'}")
    expected = losses(straight_run, "unet")
    assert losses(first, "unet") == expected[:2]
    # Resumed steps see the same batches, weights, EMA and optimizer state: equal to fp32
    # rounding (bit-equal here; the tolerance allows other BLAS builds).
    assert losses(resumed, "unet") == pytest.approx(expected[2:], rel=1e-5)


def test_exported_folder_loads_in_stock_diffusers_and_runs_in_paraflow(
        straight_run: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    folder = straight_run / "pipeline"
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    weights = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
    assert weights < 20e6, f"{weights} bytes of weights, over the 20 MB budget"
    run_paraflow(tmp_path / "out", ["model=pretrained", f"model.path={folder}", "steps=2"])
    (image,) = read_images(tmp_path / "out")
    assert image.shape == (64, 64, 3)
