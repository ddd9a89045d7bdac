"""A pipeline stage written outside the package (tests/user_stage: a Python file on PYTHONPATH
and a pipeline YAML on Hydra's search path), run from the CLI on one device and on 2 ranks under
sync_patch: its images equal paraflow's txt2img images with the stage's transform applied
(within 1 grey level: the reference is re-rounded from uint8)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO, read_images, run_paraflow

USER = REPO / "tests" / "user_stage"
RUN = ["model=tiny_random", "steps=3", "pipeline.progress=false", "seed=4",
       "prompt=[a red circle,a blue square]", "launcher.threads_per_rank=1"]


def run_with_user_stage(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(USER)}
    return subprocess.run([sys.executable, "-m", "paraflow", *RUN, *args,
                           f"hydra.searchpath=[file://{USER / 'conf'}]", f"output_dir={out}"],
                          cwd=out.parent, env=env, text=True, capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> list[np.ndarray]:
    out = tmp_path_factory.mktemp("plain") / "run"
    run_paraflow(out, RUN)
    return read_images(out)


def expected(plain: np.ndarray, amount: float) -> np.ndarray:
    sys.path.insert(0, str(USER))
    try:
        from vignette import vignette
    finally:
        sys.path.remove(str(USER))
    pixels = torch.from_numpy(plain.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    out = vignette(pixels, amount).clamp(-1, 1)
    return ((out[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)


@pytest.mark.parametrize("ranks", [
    pytest.param([], id="one_device"),
    pytest.param(["+strategy=sync_patch", "launcher.devices=2"], id="sync_patch_2",
                 marks=pytest.mark.slow),
])
def test_user_stage_runs_in_the_graph(ranks: list[str], plain: list[np.ndarray],
                                      tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run_with_user_stage(out, "pipeline=vignette", *ranks)
    assert result.returncode == 0, result.stderr[-2000:]
    got = read_images(out)
    assert len(got) == 2
    for mine, base in zip(got, plain):
        diff = np.abs(mine.astype(int) - expected(base, 0.8).astype(int))
        assert diff.max() <= 1, f"max pixel difference {diff.max()}"
        assert np.abs(mine.astype(int) - base.astype(int)).max() > 20  # the stage did run


def test_user_stage_check_refuses_a_bad_option(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run_with_user_stage(out, "pipeline=vignette",
                                 "pipeline.stages.vignette.options.amount=3")
    assert result.returncode == 2
    assert "pipeline.stages.vignette.options.amount=3: use 0..1" in result.stderr
    assert not out.exists()


def test_wiring_that_misses_the_stage_parameters_is_refused(tmp_path: Path) -> None:
    """save consumes `vignetted` without binding it to its `pixels` parameter: refused before
    launch, naming the stage, the input and what it takes."""
    out = tmp_path / "run"
    result = run_with_user_stage(out, "pipeline=vignette",
                                 "pipeline.stages.save.inputs=[vignetted,latents,image_ids]")
    assert result.returncode == 2
    assert ("pipeline.stages.save (paraflow.stages.save.Save): input 'vignetted' is not a "
            "parameter of the stage, which takes pixels, latents, image_ids") in result.stderr
    assert not out.exists()
